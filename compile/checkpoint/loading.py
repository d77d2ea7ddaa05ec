"""Safetensors files -> canonical weights: every key planned and checked before any tensor is read; InternLM2's packed wqkv."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from internvl_aot.graphs.config import ModelConfig
from .errors import CheckpointError, PathLike
from .config import _read_json, load_config
from .names import _map_key
from .random_weights import canonical_shapes


# ================================================================ safetensors files

def _weight_files(path: Path) -> list[Path]:
    index = _read_json(path / "model.safetensors.index.json")
    if index is not None:
        files = sorted({path / f for f in index["weight_map"].values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{path / 'model.safetensors.index.json'} names missing shard {f.name}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    pickled = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
    if pickled:
        raise CheckpointError(
            f"{path} has only pickled weights ({', '.join(pickled[:3])}); they are never unpickled here. "
            "Convert them to safetensors first, e.g. load the model once with transformers "
            "(trust_remote_code=True) and call save_pretrained(dir, safe_serialization=True).")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


class _SafetensorsReader:
    """Key -> file index over one or more safetensors files, opened lazily (mmap)."""

    def __init__(self, files: list[Path]):
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self.file_of: dict[str, Path] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                if k in self.file_of:
                    raise CheckpointError(f"key {k!r} is in both {self.file_of[k].name} and {f.name}")
                self.file_of[k] = f

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.file_of[key]].get_tensor(key)


# ================================================================ loading

def _fmt_keys(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _plan(keys, fmt: str, arch: str):
    """Source keys -> (canonical <- key copies, canonical qkv <- [q, k, v] keys,
    layer prefix <- packed wqkv key, (module prefix, kind) <- Phi-3 fused key, unexpected keys)."""
    copies: dict[str, str] = {}
    qkv_parts: dict[str, list] = {}
    wqkv: dict[str, str] = {}
    fused: dict[tuple, str] = {}
    unexpected = []
    for key in keys:
        m = _map_key(key, fmt, arch)
        if m is None:
            unexpected.append(key)
        elif m[0] == "copy":
            if m[1] in copies:
                raise CheckpointError(f"keys {copies[m[1]]!r} and {key!r} both map to {m[1]!r}")
            copies[m[1]] = key
        elif m[0] == "qkv":
            qkv_parts.setdefault(m[1], [None, None, None])[m[2]] = key
        elif m[0] == "wqkv":
            wqkv[m[1]] = key
        elif m[0] == "fused":
            fused[(m[1], m[2])] = key
    return copies, qkv_parts, wqkv, fused, unexpected


_FUSED_PARTS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def load_checkpoint(path: PathLike, dtype: Optional[torch.dtype] = None
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(canonical config, canonical state dict) of an InternVL checkpoint directory.

    `dtype` casts the floating tensors as they are read (None keeps the stored dtype).
    Names, shapes and completeness are all checked before any tensor is read.
    """
    path = Path(path)
    cfg = load_config(path)
    l = cfg.llm
    expected = canonical_shapes(cfg)
    reader = _SafetensorsReader(_weight_files(path))
    copies, qkv_parts, wqkv, fused, unexpected = _plan(reader.file_of, cfg.extra["format"], l.arch)

    produced = set(copies) | set(qkv_parts)
    for prefix in wqkv:
        produced |= {prefix + f"{n}_proj.weight" for n in "qkv"}
    fused_of: dict[str, tuple] = {}      # canonical name <- (fused key, kind, part index)
    for (prefix, kind), key in fused.items():
        for i, part in enumerate(_FUSED_PARTS[kind]):
            fused_of[prefix + part + ".weight"] = (key, kind, i)
    produced |= set(fused_of)
    tie_from_embed = ("language_model.lm_head.weight" not in produced and l.tie_word_embeddings
                      and "language_model.embed_tokens.weight" in produced)
    if tie_from_embed:
        produced.add("language_model.lm_head.weight")

    def source_of(canon: str) -> str:
        if canon in qkv_parts:
            return next(k for k in qkv_parts[canon] if k)
        if canon in fused_of:
            return fused_of[canon][0]
        return copies.get(canon, canon)

    unexpected += [source_of(c) for c in produced - set(expected)]
    if unexpected:
        raise CheckpointError(f"unexpected keys in {path}: {_fmt_keys(unexpected)}")
    missing = set(expected) - produced
    for canon, parts in qkv_parts.items():
        missing |= {canon.replace("attn.qkv", f"attention.{'qkv'[i]}_proj") for i, k in enumerate(parts) if k is None}
    if missing:
        raise CheckpointError(f"missing keys in {path} (canonical names): {_fmt_keys(missing)}")

    def check(key: str, want: tuple[int, ...]):
        got = reader.shape(key)
        if got != tuple(want):
            raise CheckpointError(f"shape mismatch for {key!r}: checkpoint {list(got)}, config expects {list(want)}")

    for canon, key in copies.items():
        check(key, expected[canon])
    for canon, parts in qkv_parts.items():
        for k in parts:
            check(k, (expected[canon][0] // 3,) + expected[canon][1:])
    rows = (l.num_heads + 2 * l.num_kv_heads) * l.head_dim
    for key in wqkv.values():
        check(key, (rows, l.hidden_size))
    for (prefix, kind), key in fused.items():
        check(key, (rows if kind == "qkv" else 2 * l.intermediate_size, l.hidden_size))

    def read(key: str) -> torch.Tensor:
        t = reader.get(key)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    state: dict[str, torch.Tensor] = {}
    for canon in expected:  # canonical order
        if canon in copies:
            state[canon] = read(copies[canon])
        elif canon in qkv_parts:
            state[canon] = torch.cat([read(k) for k in qkv_parts[canon]], dim=0)
        elif canon in fused_of:
            key, kind, i = fused_of[canon]
            t = reader.get(key)  # rows [q; k; v] (heads, kv heads, kv heads) or [gate; up]
            sizes = ([l.num_heads * l.head_dim] + [l.num_kv_heads * l.head_dim] * 2 if kind == "qkv"
                     else [l.intermediate_size] * 2)
            part = t.split(sizes, dim=0)[i].contiguous()
            state[canon] = part.to(dtype) if dtype is not None and part.is_floating_point() else part
        elif canon.endswith("self_attn.q_proj.weight") and canon[:-len("q_proj.weight")] in wqkv:
            prefix = canon[:-len("q_proj.weight")]
            q, k, v = unpack_wqkv(read(wqkv[prefix]), l.num_heads, l.num_kv_heads, l.head_dim)
            state[prefix + "q_proj.weight"], state[prefix + "k_proj.weight"], state[prefix + "v_proj.weight"] = q, k, v
    if tie_from_embed:
        state["language_model.lm_head.weight"] = state["language_model.embed_tokens.weight"].clone()
    return cfg, {k: state[k] for k in expected}


def unpack_wqkv(w: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's packed wqkv, rows grouped per KV head as (kv_heads, q_per_kv + 2, head_dim):
    q_per_kv query heads, then that group's key head, then its value head."""
    g = num_heads // num_kv_heads
    x = w.reshape(num_kv_heads, g + 2, head_dim, w.shape[-1])
    q = x[:, :g].reshape(num_heads * head_dim, -1).contiguous()
    k = x[:, g].reshape(num_kv_heads * head_dim, -1).contiguous()
    v = x[:, g + 1].reshape(num_kv_heads * head_dim, -1).contiguous()
    return q, k, v


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """The inverse of unpack_wqkv (used to write InternLM2-format test checkpoints)."""
    g, H = num_heads // num_kv_heads, q.shape[-1]
    return torch.cat([q.reshape(num_kv_heads, g, head_dim, H), k.reshape(num_kv_heads, 1, head_dim, H),
                      v.reshape(num_kv_heads, 1, head_dim, H)], dim=1).reshape(-1, H)
