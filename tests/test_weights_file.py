"""The artifact's weights file (runtime/weights_file.py): standard safetensors, every tensor 64-byte aligned.

Read back by safetensors' own reader (which we did not write): the same tensors, bit for bit, and each
tensor's data at a multiple of 64 bytes in the memory map (ATen's int8 GEMM crashes on unaligned int8
weights). The loader refuses an unaligned int8 weight with a message instead of a crash.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from internvl_aot.runtime import weights_file
from internvl_aot.runtime.graph_loader import GraphLoadError, _bind


def _odd_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.int8": torch.randint(-127, 128, (7, 13), generator=g, dtype=torch.int8),     # 91 bytes
        "b.bf16": torch.randn(3, 5, generator=g).bfloat16(),                             # 30 bytes
        "c.f32": torch.randn(11, generator=g),
        "d.scalar": torch.tensor(2.5, dtype=torch.float16),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.i64": torch.arange(5),
    }


def test_written_file_is_standard_safetensors_with_every_tensor_aligned(tmp_path):
    tensors = _odd_tensors()
    path = tmp_path / "w.safetensors"
    info = weights_file.write(tensors, path, metadata={"format": "pt"})
    assert info["pad_bytes"] > 0                       # the odd sizes needed padding
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    assert (8 + hlen) % weights_file.ALIGN == 0 and json.loads(raw[8:8 + hlen])["__metadata__"] == {"format": "pt"}
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        real = [k for k in f.keys() if not k.startswith(weights_file.PAD_PREFIX)]
        assert sorted(real) == sorted(tensors)
        for k in real:
            assert torch.equal(f.get_tensor(k), tensors[k]) and f.get_tensor(k).dtype == tensors[k].dtype
    mapped = load_file(str(path))                     # memory-mapped: the addresses are the file's offsets
    assert all(mapped[k].data_ptr() % weights_file.ALIGN == 0 for k in tensors if tensors[k].numel())
    ours = weights_file.read(path)
    assert sorted(ours) == sorted(tensors) and all(torch.equal(ours[k], tensors[k]) for k in tensors)


def test_reserved_names_and_unknown_dtypes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        weights_file.write({weights_file.PAD_PREFIX + "0": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="complex"):
        weights_file.write({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "y.safetensors")


def test_loader_refuses_an_unaligned_int8_weight(tmp_path):
    # safetensors' own writer puts the int8 matrix right after a 3-byte tensor: not 16-byte aligned.
    path = tmp_path / "old.safetensors"
    save_file({"a": torch.zeros(3, dtype=torch.uint8), "b": torch.ones(4, 8, dtype=torch.int8)}, str(path))
    weights = load_file(str(path))
    assert weights["b"].data_ptr() % 16
    info = {"constants": {"w": {"key": "b", "dtype": "int8", "shape": [4, 8]}}}
    with pytest.raises(GraphLoadError, match="aligned.*recompile"):
        _bind("g", info, weights, None, torch.device("cpu"))
    aligned = tmp_path / "new.safetensors"
    weights_file.write({"a": torch.zeros(3, dtype=torch.uint8), "b": torch.ones(4, 8, dtype=torch.int8)}, aligned)
    assert _bind("g", info, weights_file.read(aligned), None, torch.device("cpu"))["w"].data_ptr() % 16 == 0


def test_compiled_artifact_weights_are_aligned(tiny_artifact):
    art = tiny_artifact("qwen2_vit300m")
    manifest = json.loads((art / "manifest.json").read_text())
    for rank in manifest["ranks"]:
        mapped = load_file(str(art / rank["weights"]))
        assert all(t.data_ptr() % weights_file.ALIGN == 0 for k, t in mapped.items()
                   if t.numel() and not k.startswith(weights_file.PAD_PREFIX))
