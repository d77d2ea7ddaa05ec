"""The ONNX artifact's one weights file, memory-mapped with numpy (no torch, no copy).

compile/backends/onnx.py writes `weights.bin` (every graph's ONNX external data) and the manifest's
`weights_index` (key -> offset, nbytes, dtype, shape); each tensor here is a read-only view of one
np.memmap, so its pages are shared by every onnxruntime session (and with the page cache)."""
from __future__ import annotations

import os

import numpy as np


class WeightsError(RuntimeError):
    pass


def map_weights(path: str | os.PathLike, index: dict[str, dict]) -> dict[str, np.ndarray]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} not found: point --artifact at a compiled artifact directory")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for key, e in index.items():
        a, n = int(e["offset"]), int(e["nbytes"])
        if a + n > mm.shape[0]:
            raise WeightsError(f"weights file {path} is truncated ({key}): copy it again or recompile")
        out[key] = mm[a:a + n].view(np.dtype(e["dtype"])).reshape(e["shape"])
    return out
