"""Each `.onnx` of an artifact as one onnxruntime session, behind the graph-callable interface.

- Weights: every large initializer is handed to every session with `SessionOptions.add_initializer`
  as an OrtValue over the one memory-mapped weights file (runtime/onnx/weights.py), so N sessions
  cost the weights once (onnxruntime keeps a pointer to user-added initializers, it does not copy
  them). Pre-packing of MatMul weights would give each session its own packed copy, so it is off
  unless INTERNVL_ORT_PREPACK=1 (docs/performance.md, "ONNX", has the measured difference).
- KV pool: the graphs read `k_cache`/`v_cache` and return only this call's rows (`new_k`, `new_v`
  `[layers, tokens, kv_heads, head_dim]`); `__call__` writes those rows into the caller's pool at
  `slot_mapping` before it returns, so to the model runner the call is what an AOTInductor graph
  call is: logits out, K/V written in place. The pool arrays are bound to the sessions as OrtValues
  over their own memory (made once per pool, IOBinding), never copied per call.
- Inputs may be numpy arrays or CPU torch tensors (the torch Engine's runner passes tensors; they
  are viewed as numpy without a copy); logits come back as the same kind. torch is never imported
  here: a torch tensor can only reach this code if torch is already loaded.
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

STAGE_INPUTS = {
    "vision": ["pixel_values"],
    "prefill": ["input_ids", "positions", "image_embeds", "image_mask", "slot_mapping", "block_table", "last_index",
                "k_cache", "v_cache"],
    "decode": ["input_ids", "positions", "slot_mapping", "block_tables", "k_cache", "v_cache"],
}


def _stage(name: str) -> str:
    return name.split("_", 1)[0]


def _as_numpy(x):
    if isinstance(x, np.ndarray):
        return x, False
    return x.detach().numpy(), True        # a CPU torch tensor: a view, no copy


class SharedWeights:
    """One OrtValue per weight key, made once, given to every session."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self._values = {}

    def ortvalue(self, key: str):
        import onnxruntime as ort
        if key not in self._values:
            a = self.arrays.get(key)
            if a is None:
                raise KeyError(f"weight {key!r} is absent from the weights file: recompile the artifact")
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(a)
        return self._values[key]


def session_options(threads: int | None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or 0)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if os.environ.get("INTERNVL_ORT_PREPACK", "0") != "1":
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


class OnnxGraph:
    def __init__(self, name: str, path: str, initializers: dict[str, str], shared: SharedWeights,
                 block_size: int, threads: int | None = None):
        import onnxruntime as ort
        self.name, self.stage, self.block_size = name, _stage(name), block_size
        so = session_options(threads)
        # onnxruntime keeps only a pointer to user-added initializers: hold the OrtValues and the
        # memory-mapped arrays under them for the session's life (freeing them segfaults the next run).
        self.shared = shared
        for init_name, key in initializers.items():
            so.add_initializer(init_name, shared.ortvalue(key))
        try:
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        except Exception as e:      # onnxruntime raises its own exception types
            raise RuntimeError(f"graph {name}: onnxruntime cannot load {path} ({str(e).splitlines()[0]}): "
                               "recompile the artifact") from None
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._pool_values: dict = {}
        self._lock = threading.Lock()
        self.calls = 0

    def _pool_value(self, array: np.ndarray):
        """The OrtValue over a pool array's own memory (made once per pool array)."""
        import onnxruntime as ort
        key = (array.__array_interface__["data"][0], array.shape, array.dtype.str)
        v = self._pool_values.get(key)
        if v is None:
            if not array.flags.c_contiguous:
                raise ValueError(f"graph {self.name}: the KV pool must be contiguous")
            v = self._pool_values[key] = (ort.OrtValue.ortvalue_from_numpy(array), array)
        return v[0]

    def __call__(self, *inputs):
        names = STAGE_INPUTS[self.stage]
        if len(inputs) != len(names):
            raise TypeError(f"graph {self.name} takes {len(names)} inputs, got {len(inputs)}")
        arrays, from_torch = {}, False
        for n, x in zip(names, inputs):
            arrays[n], t = _as_numpy(x)
            from_torch |= t
        with self._lock:
            io = self.session.io_binding()
            for n, a in arrays.items():
                if n not in self.input_names:
                    continue            # an input the exporter found unused (e.g. slot_mapping)
                if n in ("k_cache", "v_cache"):
                    io.bind_ortvalue_input(n, self._pool_value(a))
                else:
                    io.bind_cpu_input(n, np.ascontiguousarray(a))
            for o in self.output_names:
                io.bind_output(o, "cpu")
            self.session.run_with_iobinding(io)
            outs = io.copy_outputs_to_cpu()
            self.calls += 1
        if self.stage != "vision":
            self.write_rows(arrays["k_cache"], arrays["v_cache"], arrays["slot_mapping"], outs[1], outs[2])
        out = outs[0]
        if from_torch:
            out = sys.modules["torch"].from_numpy(out)
        return out

    def write_rows(self, k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray, new_k, new_v) -> None:
        """new_k/new_v [layers, N, kvh, d] into the pools at the flat slots [N] (padding goes to sink block 0)."""
        slots = np.asarray(slots).reshape(-1)
        blk, off = slots // self.block_size, slots % self.block_size
        k_cache[:, blk, off] = new_k
        v_cache[:, blk, off] = new_v


def load_graphs(artifact, manifest: dict, rank: int = 0, threads: int | None = None) -> dict[str, OnnxGraph]:
    from pathlib import Path
    from .weights import map_weights
    artifact = Path(artifact)
    entry = manifest["ranks"][rank]
    shared = SharedWeights(map_weights(artifact / entry["weights"], entry["weights_index"]))
    bs = int(manifest["buckets"]["block_size"])
    return {name: OnnxGraph(name, str(artifact / g["onnx"]), g["initializers"], shared, bs, threads)
            for name, g in entry["graphs"].items()}
