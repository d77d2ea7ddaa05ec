"""Rotary position embeddings (rotate-half layout, as Llama, Qwen2/3, InternLM2 and Phi-3 use).

cos/sin are computed from the token positions inside the graph; the compile pass
`compile/passes/rope_table.py` folds them into a per-bucket constant table.

Scaling kinds (`LLMConfig.rope_scaling`):
- `linear`: positions divided by `factor` (folded into inv_freq);
- `dynamic` (NTK, InternLM2 / Llama / Qwen2 / InternLM3 semantics): the base grows once the
  sequence exceeds max_position_embeddings; a graph is built for one maximum sequence length;
- `longrope` (Phi-3's "su"): inv_freq = 1 / (ext_factor * base^(2i/d)) with the short factors
  for positions below `original_max_position_embeddings` and the long factors from there on,
  and cos/sin multiplied by the attention factor sqrt(1 + ln(s) / ln(original)), s = max / original.
  transformers (and InternVL2-4B's own modeling_phi3.py) pick short or long once per forward
  call, from max(position_ids) + 1 > original. Here the choice is per sequence and step: a
  decode row, or a prefill chunk, uses the long factors when its largest position is >=
  original. That is the reference's rule for every decode step and for a prompt prefilled in
  one chunk; a prompt longer than the threshold that is prefilled in several chunks gets the
  short factors in its chunks that end below the threshold, where the reference (one forward
  over the whole prompt) uses the long ones.
"""
from __future__ import annotations

import math

import torch
from torch import nn

LONGROPE_TYPES = ("longrope", "su")


def scaling_kind(scaling: dict | None) -> str | None:
    return (scaling or {}).get("type") or (scaling or {}).get("rope_type")


def _exponents(head_dim: int) -> torch.Tensor:
    """2i/d for i < d/2: every RoPE variant's frequencies are base^-(2i/d), scaled."""
    return torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, max_position: int,
                  max_seq_len: int) -> torch.Tensor:
    """inverse frequencies, with `linear` scaling folded into them and `dynamic` NTK scaling
    applied for the sequence length the graph is built for (InternLM2 / Llama semantics:
    the base grows only once the sequence exceeds max_position_embeddings). For `longrope`
    these are the short-factor frequencies (see longrope_params for the rest)."""
    kind = scaling_kind(scaling)
    factor = float((scaling or {}).get("factor", 1.0) or 1.0)
    base = theta
    if kind == "dynamic" and max_seq_len > max_position:
        base = theta * ((factor * max_seq_len / max_position) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponent = _exponents(head_dim)
    if kind in LONGROPE_TYPES:
        return 1.0 / (_ext_factors(scaling["short_factor"], head_dim) * base ** exponent)
    inv_freq = 1.0 / (base ** exponent)
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind not in (None, "default", "dynamic"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, dynamic, longrope)")
    return inv_freq


def _ext_factors(factors, head_dim: int) -> torch.Tensor:
    t = torch.tensor([float(f) for f in factors], dtype=torch.float32)
    if t.numel() != head_dim // 2:
        raise ValueError(f"longrope factors: {t.numel()} values, head_dim {head_dim} needs {head_dim // 2}")
    return t


def longrope_params(head_dim: int, theta: float, scaling: dict, max_position: int
                    ) -> tuple[torch.Tensor, int, float]:
    """(long-factor inv_freq, original_max_position_embeddings, attention factor) of a longrope config."""
    original = int(scaling["original_max_position_embeddings"])
    exponent = _exponents(head_dim)
    long_inv = 1.0 / (_ext_factors(scaling["long_factor"], head_dim) * theta ** exponent)
    attn = scaling.get("attention_factor")
    if attn is None:
        factor = scaling.get("factor") or max_position / original
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return long_inv, original, float(attn)


class RotaryEmbedding(nn.Module):
    """positions -> (cos, sin). `long_inv_freq` (longrope) is used for positions >= long_from."""

    def __init__(self, inv_freq: torch.Tensor, long_inv_freq: torch.Tensor | None = None, long_from: int = 0,
                 attention_factor: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if long_inv_freq is not None:
            self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)
        else:
            self.long_inv_freq = None
        self.long_from = long_from
        self.attention_factor = attention_factor

    @staticmethod
    def _trig(positions: torch.Tensor, inv_freq: torch.Tensor):
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (one row per sequence) or [T] -> cos, sin [B*T, head_dim] in `dtype`
        (computed in fp32, cast once)."""
        flat = positions.reshape(-1)
        cos, sin = self._trig(flat, self.inv_freq)
        if self.long_inv_freq is not None:
            cos_l, sin_l = self._trig(flat, self.long_inv_freq)
            # long factors for every token of a sequence whose furthest position in this step reaches the threshold
            rows = positions.reshape(-1, positions.shape[-1])
            use_long = (rows.amax(-1, keepdim=True) >= self.long_from).expand_as(rows).reshape(-1, 1)
            cos, sin = torch.where(use_long, cos_l, cos), torch.where(use_long, sin_l, sin)
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotary_embedding(head_dim: int, theta: float, scaling: dict | None, max_position: int,
                     max_seq_len: int) -> RotaryEmbedding:
    """The rotary module of an LLM config for graphs serving sequences of up to max_seq_len tokens."""
    inv = rope_inv_freq(head_dim, theta, scaling, max_position, max_seq_len)
    if scaling_kind(scaling) not in LONGROPE_TYPES:
        return RotaryEmbedding(inv)
    long_inv, original, attn = longrope_params(head_dim, theta, scaling, max_position)
    # Positions stay below max_seq_len: when that is within the original window the long
    # factors are never used and the graph leaves them out.
    if max_seq_len <= original:
        return RotaryEmbedding(inv, attention_factor=attn)
    return RotaryEmbedding(inv, long_inv, original, attn)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
