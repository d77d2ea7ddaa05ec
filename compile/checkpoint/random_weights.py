"""Canonical weight shapes of a config, random weights of those shapes (WEIGHTS=random), parameter counts, a checkpoint fingerprint."""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch

from internvl_aot.graphs.config import ModelConfig
from .errors import PathLike


# ================================================================ canonical shapes

def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical weight name (docs/CONTRACTS.md) with its shape, in module order."""
    v, l = cfg.vision, cfg.llm
    C, I, grid = v.hidden_size, v.intermediate_size, v.image_size // v.patch_size
    s: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, C),
        "vision_model.embeddings.patch_embedding.weight": (C, 3, v.patch_size, v.patch_size),
        "vision_model.embeddings.patch_embedding.bias": (C,),
        "vision_model.embeddings.position_embedding": (1, 1 + grid * grid, C),
    }
    norms = ("weight", "bias") if v.norm_type == "layer_norm" else ("weight",)
    for i in range(v.num_layers):
        p = f"vision_model.encoder.layers.{i}."
        s.update({p + f"norm1.{n}": (C,) for n in norms})
        s[p + "attn.qkv.weight"] = (3 * C, C)
        if v.qkv_bias:
            s[p + "attn.qkv.bias"] = (3 * C,)
        if v.qk_normalization:
            s[p + "attn.q_norm.weight"] = (C,)
            s[p + "attn.k_norm.weight"] = (C,)
        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = (C, C), (C,)
        s[p + "ls1"], s[p + "ls2"] = (C,), (C,)
        s.update({p + f"norm2.{n}": (C,) for n in norms})
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (I, C), (I,)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (C, I), (C,)
    P, H, V = cfg.projector_in, l.hidden_size, l.vocab_size
    s.update({"mlp1.0.weight": (P,), "mlp1.0.bias": (P,), "mlp1.1.weight": (H, P), "mlp1.1.bias": (H,),
              "mlp1.3.weight": (H, H), "mlp1.3.bias": (H,)})
    q, kv = l.num_heads * l.head_dim, l.num_kv_heads * l.head_dim
    s["language_model.embed_tokens.weight"] = (V, H)
    for i in range(l.num_layers):
        p = f"language_model.layers.{i}."
        s[p + "input_layernorm.weight"] = (H,)
        for n, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            s[p + f"self_attn.{n}.weight"] = (rows, H)
            if l.qkv_bias:
                s[p + f"self_attn.{n}.bias"] = (rows,)
        if l.qk_norm:
            s[p + "self_attn.q_norm.weight"] = (l.head_dim,)
            s[p + "self_attn.k_norm.weight"] = (l.head_dim,)
        s[p + "self_attn.o_proj.weight"] = (H, q)
        s[p + "post_attention_layernorm.weight"] = (H,)
        s[p + "mlp.gate_proj.weight"] = (l.intermediate_size, H)
        s[p + "mlp.up_proj.weight"] = (l.intermediate_size, H)
        s[p + "mlp.down_proj.weight"] = (H, l.intermediate_size)
    s["language_model.norm.weight"] = (H,)
    s["language_model.lm_head.weight"] = (V, H)
    return s


def num_parameters(cfg: ModelConfig) -> int:
    return sum(math.prod(shape) for shape in canonical_shapes(cfg).values())


# ================================================================ random weights, fingerprint

def _random_kind(name: str) -> str:
    if name.endswith((".ls1", ".ls2")):
        return "layer_scale"
    if re.search(r"(norm\d?|layernorm|norm|mlp1\.0)\.weight$", name):
        return "norm"
    if name.endswith("bias"):
        return "bias"
    return "weight"


def random_weights(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Canonical weights of the right shapes for WEIGHTS=random builds.

    Matrices ~ N(0, 1/fan_in) (embeddings N(0, 0.02)), norm weights ~1, biases small,
    layer scales in [0.1, 1]. Each tensor is allocated once in `dtype` and filled in place
    from a shared pool of normal samples at random offsets, so a 70B model neither needs
    fp32 copies nor minutes of random number generation.
    """
    g = torch.Generator().manual_seed(seed)
    pool_n = 1 << 22
    pool = torch.randn(2 * pool_n + 1, generator=g).to(dtype)
    out: dict[str, torch.Tensor] = {}
    for name, shape in canonical_shapes(cfg).items():
        t = torch.empty(shape, dtype=dtype)
        flat = t.view(-1)
        if flat.numel() <= 1 << 16:
            flat.normal_(generator=g)  # small tensors: independent samples
        else:
            for start in range(0, flat.numel(), pool_n):
                n = min(pool_n, flat.numel() - start)
                off = int(torch.randint(0, pool_n + 1, (1,), generator=g))
                flat[start:start + n].copy_(pool[off:off + n])
        kind = _random_kind(name)
        if kind == "layer_scale":
            t.uniform_(0.1, 1.0, generator=g)
        elif kind == "norm":
            t.mul_(0.05).add_(1.0)
        elif kind == "bias":
            t.mul_(0.02)
        elif "embed" in name or "position_embedding" in name or "class_embedding" in name:
            t.mul_(0.02)
        else:
            t.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
        out[name] = t
    return out


def checkpoint_fingerprint(path: PathLike) -> str:
    """sha256 over config.json, the tokenizer/index json files, and each safetensors file's
    name, size and first MiB (its header and the start of its data): cheap, and it changes
    whenever the weights or their layout do."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "tokenizer_config.json",
                 "added_tokens.json", "preprocessor_config.json"):
        p = path / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    for p in sorted(path.glob("*.safetensors")):
        h.update(p.name.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()
