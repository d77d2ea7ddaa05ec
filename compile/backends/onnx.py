"""BACKEND=onnx: every bucket graph as an ONNX model, the weights stored once for all of them.

Per graph: the ONNX stage variant (compile/backends/onnx_graphs.py: the pool is read, the new K/V rows
are returned) -> torch.export (the same export and fusion passes as AOTInductor, less small_m_linear,
which is a CPU-Inductor lowering) -> `torch.onnx.export(ep, dynamo=True)` at opset 18 -> for
OPSET < 18, compile/backends/onnx_opset.py rewrites the few operators whose form changed.

Weights: one raw file per rank, `rank0/graphs/weights.bin`, the ONNX external-data file of every
graph: each initializer of each `.onnx` points at its bytes there (location, offset, length), so plain
onnxruntime, onnx.checker or Ascend's ATC read the graphs without us. The manifest's `weights_index`
(key -> offset, bytes, dtype, shape) lets the runtime memory-map it with numpy alone and hand one
OrtValue per tensor to every onnxruntime session (runtime/onnx/graphs.py). The file is appended graph
by graph, so only one graph's exported tensors (a pass's fused copies) are alive at a time. Initializers named after a
state-dict entry are keyed by that name; anything else the exporter or a pass made (fused weights,
weights the exporter's optimizer pre-transposed, RoPE tables, masks) by its content hash alone, so
identical tensors of different buckets are stored once whatever each graph calls them.
Initializers under 1 KB (shape constants, axes) stay inside their graph.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...graphs.config import ModelConfig
from ...graphs.model import build_model
from ...runtime.buckets import GraphKey, graph_inputs
from ...runtime.manifest import DTYPES, write_manifest
from ...runtime.tokenizer import Tokenizer
from ..buckets import Buckets
from ..spec import build_spec

ONNX_FORMAT = 1
WEIGHTS_FILE = "weights.bin"
DEFAULT_OPSET = 18
MIN_OPSET = 11              # ATC's ONNX front end takes opsets 11..15
INLINE_BYTES = 1024
ONNX_PASSES = ["qkv_fusion", "gate_up_fusion", "add_rmsnorm", "rope_table"]


def check_onnx_request(dtype: str, tp: int, opset: int, target: str = "native") -> None:
    """Everything BACKEND=onnx refuses, before any weight is read."""
    if dtype == "bf16":
        raise ValueError("BACKEND=onnx takes DTYPE=fp32 or fp16: onnxruntime's CPU kernels have no bf16 MatMul "
                         "(and ATC's ONNX path expects fp32/fp16)")
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"DTYPE must be fp32 or fp16 for BACKEND=onnx, got {dtype!r}")
    if tp != 1:
        raise ValueError("BACKEND=onnx is single-rank for now (TP=1): the graphs carry no collectives")
    if not MIN_OPSET <= opset <= DEFAULT_OPSET:
        raise ValueError(f"OPSET must be {MIN_OPSET}..{DEFAULT_OPSET} (15 for Ascend ATC), got {opset}")
    if opset < 15:
        raise ValueError(f"OPSET={opset}: the rewrite to older opsets is implemented down to 15 (ATC takes 15)")
    if target != "native":
        raise ValueError("TARGET applies to AOTInductor CPU code; BACKEND=onnx graphs are CPU-independent")


def export_onnx_graph(model, buckets: Buckets, name: str, tdtype, passes=None):
    """One bucket: torch.export of the ONNX stage variant, the passes, torch.onnx.export -> (ir.Model, ep)."""
    from torch.export import Dim
    from ..export import example_inputs
    from ..passes import run_passes
    from .onnx_graphs import onnx_stage_module
    stage = GraphKey.parse(name).stage
    args = example_inputs(model, buckets, name, tdtype, torch.device("cpu"))
    dynamic = None
    if stage != "vision":
        blocks = Dim("num_blocks", min=2, max=1 << 24)
        dynamic = [None] * (len(args) - 2) + [{1: blocks}, {1: blocks}]
    with torch.no_grad():
        ep = torch.export.export(onnx_stage_module(model, stage), args, dynamic_shapes=dynamic, strict=False)
    ep, report = run_passes(ep, ONNX_PASSES if passes is None else passes,
                            {"rope_table": {"max_context": buckets.max_context}})
    prog = torch.onnx.export(ep, (), dynamo=True, opset_version=DEFAULT_OPSET, optimize=True, verbose=False,
                             output_names=_output_names(stage))
    return prog.model, ep, report


def _output_names(stage: str) -> list[str]:
    return ["image_embeds"] if stage == "vision" else ["logits", "new_k", "new_v"]


class WeightStore:
    """The distinct initializer tensors of every graph of a rank, appended to one raw file as they come
    (so only one graph's exported tensors are alive at a time), each under one key."""

    def __init__(self, path: Path, state_dict_names: set[str]):
        self.path, self.names = path, state_dict_names
        self.index: dict[str, dict] = {}
        self._f = open(path, "wb")

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if name in self.names:
            key = name
        else:
            h = hashlib.sha1(memoryview(array.reshape(-1).view(np.uint8)))
            h.update(f"{array.dtype}{array.shape}".encode())
            key = f"_onnx.{h.hexdigest()[:16]}"       # by content only: the exporter's names differ per graph
        prev = self.index.get(key)
        if prev is not None:
            if prev["shape"] != list(array.shape) or prev["dtype"] != array.dtype.name:
                raise ValueError(f"initializer {key!r} differs between graphs: {prev['shape']} vs {list(array.shape)}")
            return key
        offset = self._f.tell()
        pad = -offset % 64                  # every tensor 64-byte aligned
        self._f.write(b"\0" * pad)
        self._f.write(memoryview(array.reshape(-1).view(np.uint8)))
        self.index[key] = {"offset": offset + pad, "nbytes": int(array.nbytes), "dtype": array.dtype.name,
                           "shape": list(array.shape)}
        return key

    @property
    def nbytes(self) -> int:
        return sum(e["nbytes"] for e in self.index.values())

    def close(self) -> None:
        self._f.close()


def externalize(model, store: WeightStore, graphs_dir: Path) -> dict[str, str]:
    """Every initializer of an ir.Model of 1 KB or more -> the store, the model pointing at its bytes
    there; -> initializer name -> key."""
    import onnx_ir as ir
    mapping = {}
    for name, value in model.graph.initializers.items():
        t = value.const_value
        if t is None or t.nbytes < INLINE_BYTES:
            continue
        key = mapping[name] = store.add(name, t.numpy())
        e = store.index[key]
        value.const_value = ir.ExternalTensor(WEIGHTS_FILE, e["offset"], e["nbytes"], t.dtype, shape=t.shape,
                                              name=name, base_dir=str(graphs_dir))
    return mapping


def _io_rows(proto) -> tuple[list[dict], list[dict]]:
    import onnx

    def row(v):
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims}
    return [row(v) for v in proto.graph.input], [row(v) for v in proto.graph.output]


def compile_onnx(cfg: ModelConfig, weights: dict, tokenizer_dir: Path, out: Path, buckets: Buckets,
                 dtype: str = "fp32", opset: int = DEFAULT_OPSET, tp: int = 1, source: dict | None = None,
                 passes: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Checkpoint weights -> an ONNX artifact directory (format: artifacts/README.md, "ONNX")."""
    import onnx
    import onnx_ir as ir
    from ..artifact import copy_tokenizer, dir_size
    from .onnx_opset import downgrade
    check_onnx_request(dtype, tp, opset)
    t_start = time.perf_counter()
    tdtype = DTYPES[dtype]
    weights = {k: (v.to(tdtype) if v.is_floating_point() else v) for k, v in weights.items()}
    out = Path(out)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    graphs_dir = staging / "rank0" / "graphs"
    graphs_dir.mkdir(parents=True)
    spec = build_spec(cfg, buckets, dtype, Tokenizer.from_dir(tokenizer_dir))
    model = build_model(cfg, weights, max_seq_len=buckets.max_context)
    names = buckets.graph_names()
    log(f"[compile] {cfg.name}: {len(names)} ONNX graphs ({', '.join(names)}), dtype {dtype}, opset {opset}")
    if dtype == "fp16":
        log("[onnx] note: onnxruntime's x86 CPU provider runs fp16 MatMuls through fp32 casts that it folds into fp32 "
            "weight copies per session (docs/performance.md, \"ONNX\"): fp16 is for ATC / accelerators, use fp32 on x86")
    store = WeightStore(graphs_dir / WEIGHTS_FILE, set(model.state_dict()))
    entries, reports = {}, {}
    try:
        for i, name in enumerate(names, 1):
            t0 = time.perf_counter()
            ir_model, ep, report = export_onnx_graph(model, buckets, name, tdtype, passes)
            del ep
            reports[name] = {k: v.get("ops") for k, v in report.items()}
            mapping = externalize(ir_model, store, graphs_dir)
            proto = ir.serde.serialize_model(ir_model)
            del ir_model
            if opset < DEFAULT_OPSET:
                proto = downgrade(proto, opset)
            path = graphs_dir / f"{name}.onnx"
            onnx.save(proto, str(path))
            onnx.checker.check_model(str(path))      # by path: resolves the external data next to it
            inputs, outputs = _io_rows(proto)
            entries[name] = {"onnx": f"rank0/graphs/{name}.onnx", "inputs": inputs, "outputs": outputs,
                             "initializers": mapping}
            del proto
            log(f"[onnx {i}/{len(names)}] {name}: exported in {time.perf_counter() - t0:.1f} s, "
                f"{len(mapping)} external initializers (elapsed {time.perf_counter() - t_start:.0f} s)")
    finally:
        store.close()
    copy_tokenizer(Path(tokenizer_dir), staging / "tokenizer")
    wbytes = store.nbytes
    _write_readme(staging, names, entries, spec, opset)
    manifest = dict(spec)
    import platform
    manifest.update({
        "source": source or {}, "backend": "onnx",
        # No ISA requirement: onnxruntime picks its kernels on the box that runs the graphs.
        "device": {"kind": "cpu", "machine": platform.machine(), "isa": [], "target": "onnx"},
        "torch_version": torch.__version__, "tokenizer_dir": "tokenizer",
        "onnx": {"format": ONNX_FORMAT, "opset": opset, "onnx_version": onnx.__version__,
                 "kv_io": "pool read-only; new_k/new_v [layers, tokens, kv_heads, head_dim] returned, "
                          "written at slot_mapping by the runtime"},
        "ranks": [{"weights": f"rank0/graphs/{WEIGHTS_FILE}", "weights_index": store.index, "graphs": entries}],
        "graphs": sorted(entries), "compile": {"seconds": round(time.perf_counter() - t_start, 1), "passes": reports},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    write_manifest(staging, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    size = dir_size(out)
    seconds = time.perf_counter() - t_start
    log(f"[done] {out}: {len(names)} ONNX graphs, {size / 1e6:.1f} MB ({wbytes / 1e6:.1f} MB weights, "
        f"stored once), opset {opset}, in {seconds:.0f} s")
    return {"out": str(out), "graphs": len(names), "bytes": size, "weight_bytes": wbytes, "seconds": seconds}


def atc_commands(entries: dict, spec: dict, num_blocks: int, soc: str = "Ascend310P3") -> list[str]:
    """`atc --framework=5` per graph; ATC wants static shapes, so the pool's block count is fixed here."""
    cmds = []
    for name, e in entries.items():
        shapes = ";".join(f"{r['name']}:{','.join(str(num_blocks if d is None else d) for d in r['shape'])}"
                          for r in e["inputs"])
        cmds.append(f"atc --framework=5 --model=rank0/graphs/{name}.onnx --output=rank0/om/{name} "
                    f"--soc_version={soc} --input_format=ND --input_shape=\"{shapes}\"")
    return cmds


def _write_readme(staging: Path, names, entries, spec, opset):
    b = spec["buckets"]
    blocks = max(b["batch"]) * (max(b["context"]) // b["block_size"]) + 1
    lines = [
        "# ONNX artifact (internvl_aot BACKEND=onnx)", "",
        f"Opset {opset}. Graphs: {', '.join(names)}.",
        f"Weights: rank0/graphs/{WEIGHTS_FILE} is the ONNX external-data file of every graph:",
        "every graph reads the same bytes; nothing is duplicated per graph.", "",
        "KV cache: prefill/decode graphs take the pool `k_cache`, `v_cache` `[layers, num_blocks, block_size, "
        "kv_heads, head_dim]` as read-only inputs and return `new_k`, `new_v` `[layers, tokens, kv_heads, head_dim]`;",
        "the runtime writes them at `slot_mapping` (block = slot // block_size, offset = slot % block_size).", "",
        "Run (no torch needed): `pip install --no-deps <internvl-aot> && pip install -r runtime/onnx/requirements.txt`,",
        "then `internvl-run --artifact <this dir> ...` (repository README, \"ONNX\").", "",
        "## Ascend edge box (ATC, opset 11-15; NOT run by us: no CANN here)", "",
        f"ATC needs static shapes: the pool's block count is fixed below at {blocks} (largest batch x largest",
        "context / block_size + the sink block); a runtime for the .om files must allocate exactly that pool.",
        "Compile with OPSET=15 for ATC. On the box, after `source <CANN>/set_env.sh` (SoC: your NPU's,",
        "e.g. Ascend310P3 for Atlas 300I, Ascend310B1 for Atlas 200I A2):", "", "```sh", "mkdir -p rank0/om",
        *atc_commands(entries, spec, blocks), "```", ""]
    (staging / "README.md").write_text("\n".join(lines))
