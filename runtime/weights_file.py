"""The artifact's weights file: standard safetensors, every tensor's data 64-byte aligned.

Any safetensors reader opens it. It is written so that, memory-mapped (page-aligned), every
tensor starts at a multiple of ALIGN bytes:
- the data section starts at a multiple of ALIGN from the start of the file (the JSON header is
  padded with spaces, which the format allows and safetensors itself does to 8 bytes);
- tensors follow in name order, each at a multiple of ALIGN; safetensors wants the tensors to
  cover the data section without holes, so a gap is a zero-filled uint8 entry named
  `__pad__.<n>`, which `read` drops.
Why: ATen's weight-only int8 GEMM (`_weight_int8pack_mm`, torch 2.13) segfaults on an int8 weight
that is not 16-byte aligned, and `safetensors.torch.save_file` places tensors at any byte offset
(a 2B int8 artifact's batch-4 graph died on its first call); aligned rows also suit vector loads.

This module imports only torch and safetensors (it ships to edge boxes).
"""
from __future__ import annotations

import json
import os
import struct

import torch

ALIGN = 64
PAD_PREFIX = "__pad__."
# The alignment the int8 GEMM needs of its weight; `graph_loader` refuses less (an old artifact).
INT8_ALIGN = 16

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _raw(t: torch.Tensor):
    """A tensor's bytes as a numpy view (no copy for a contiguous CPU tensor)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def write(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
          align: int = ALIGN) -> dict:
    """Write `tensors` as an aligned safetensors file; returns {"tensors", "pad_bytes", "align"}."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    layout: list = []              # tensors and pad sizes, in file order
    offset, pads, pad_bytes = 0, 0, 0
    for name in sorted(tensors):
        if name.startswith(PAD_PREFIX):
            raise ValueError(f"tensor name {name!r}: the prefix {PAD_PREFIX!r} is reserved for padding")
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} is not stored in artifacts")
        if offset % align:
            gap = align - offset % align
            header[f"{PAD_PREFIX}{pads}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            layout.append(gap)
            offset, pads, pad_bytes = offset + gap, pads + 1, pad_bytes + gap
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        layout.append(t)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for item in layout:
            f.write(b"\0" * item if isinstance(item, int) else memoryview(_raw(item)))
    return {"tensors": len(tensors), "pad_bytes": pad_bytes, "align": align}


def read(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the file (memory-mapped on CPU), padding entries dropped."""
    from safetensors.torch import load_file

    weights = load_file(os.fspath(path), device=device)
    for key in [k for k in weights if k.startswith(PAD_PREFIX)]:
        del weights[key]
    return weights
