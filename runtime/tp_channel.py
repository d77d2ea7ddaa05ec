"""The tensor-parallel step channel: rank 0 tells every follower which graph to run next, with its inputs.

Before running a graph, rank 0 broadcasts one int64 buffer: the command, the graph's index and
every integer input (token ids, positions, slot mapping, block tables; image mask), then, for
vision and prefill, the float inputs (pixels, image embeddings; skipped when all zero). The
followers' loop (runtime/tp_worker.py `follow`) unpacks it and calls the same graph with its own
KV pool. A decode step costs one broadcast of a few KB. The input layout of each graph comes from
runtime/buckets.py `graph_inputs`, the same signature export traced. Commands use their own gloo
group (runtime/tp.py says why).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .buckets import GraphKey, graph_inputs
from .spec import RuntimeSpec

CMD_RUN, CMD_POOL, CMD_STOP = 1, 2, 3
HEADER = 4                                       # [command, graph index, float mask, spare]


def step_inputs(name: str, spec: RuntimeSpec) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The inputs of graph `name` other than the KV pool (runtime/buckets.py, docs/CONTRACTS.md)."""
    return graph_inputs(GraphKey.parse(name), hidden=spec.llm.hidden_size, image_size=spec.vision_image_size,
                        block_size=spec.buckets.block_size, dtype=spec.torch_dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class StepChannel:
    """Rank 0 -> followers: which graph to run next and its inputs, over a gloo group."""

    def __init__(self, spec: RuntimeSpec, graph_names: Sequence[str], group):
        self.names = sorted(graph_names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.inputs = {n: step_inputs(n, spec) for n in self.names}
        self.group = group
        ints = [sum(_numel(s) for _, dt, s in self.inputs[n] if not dt.is_floating_point) for n in self.names]
        self.buffer_len = HEADER + max(ints + [1])
        self.float_dtype = spec.torch_dtype

    def _broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist
        dist.broadcast(t, src=0, group=self.group)

    # ------------------------------------------------------------------- rank 0
    def send_run(self, name: str, inputs: Sequence[torch.Tensor]) -> None:
        buf = torch.zeros(self.buffer_len, dtype=torch.long)
        floats, mask, pos = [], 0, HEADER
        for j, ((_, dt, shape), t) in enumerate(zip(self.inputs[name], inputs)):
            if tuple(t.shape) != shape:
                raise ValueError(f"graph {name} input {j}: shape {tuple(t.shape)} != {shape}")
            if dt.is_floating_point:
                if bool(t.any()):
                    floats.append(t.detach().reshape(-1).to("cpu", self.float_dtype))
                    mask |= 1 << j
            else:
                n = t.numel()
                buf[pos:pos + n] = t.detach().reshape(-1).to("cpu", torch.long)
                pos += n
        buf[:3] = torch.tensor([CMD_RUN, self.index[name], mask])
        self._broadcast(buf)
        if floats:
            self._broadcast(torch.cat(floats))

    def send(self, command: int, arg: int = 0) -> None:
        buf = torch.zeros(self.buffer_len, dtype=torch.long)
        buf[:2] = torch.tensor([command, arg])
        self._broadcast(buf)

    # ------------------------------------------------------------------- followers
    def receive(self, device) -> tuple[int, object]:
        """-> (CMD_RUN, (name, inputs)) | (CMD_POOL, num_blocks) | (CMD_STOP, None)."""
        buf = torch.empty(self.buffer_len, dtype=torch.long)
        self._broadcast(buf)
        command, arg, mask = (int(x) for x in buf[:3])
        if command != CMD_RUN:
            return command, arg
        name = self.names[arg]
        specs = self.inputs[name]
        sizes = [_numel(s) for j, (_, dt, s) in enumerate(specs) if dt.is_floating_point and mask >> j & 1]
        flat = None
        if sizes:
            flat = torch.empty(sum(sizes), dtype=self.float_dtype)
            self._broadcast(flat)
        inputs, pos, fpos = [], HEADER, 0
        for j, (_, dt, shape) in enumerate(specs):
            n = _numel(shape)
            if dt.is_floating_point:
                if mask >> j & 1:
                    t = flat[fpos:fpos + n].view(shape)
                    fpos += n
                else:
                    t = torch.zeros(shape, dtype=dt)
            else:
                t = buf[pos:pos + n].view(shape).to(dt)
                pos += n
            inputs.append(t.to(device).contiguous())
        return CMD_RUN, (name, inputs)
