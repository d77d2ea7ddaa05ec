"""Rotary position embeddings (rotate-half layout, as Llama, Qwen2 and InternLM2 use).

cos/sin are computed from the token positions inside the graph; the compile pass
`compile/passes/rope_table.py` folds them into a per-bucket constant table.
"""
from __future__ import annotations

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, max_position: int,
                  max_seq_len: int) -> torch.Tensor:
    """inverse frequencies, with `linear` scaling folded into them and `dynamic` NTK scaling
    applied for the sequence length the graph is built for (InternLM2 / Llama semantics:
    the base grows only once the sequence exceeds max_position_embeddings)."""
    kind = (scaling or {}).get("type") or (scaling or {}).get("rope_type")
    factor = float((scaling or {}).get("factor", 1.0))
    base = theta
    if kind == "dynamic" and max_seq_len > max_position:
        base = theta * ((factor * max_seq_len / max_position) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind not in (None, "default", "dynamic"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, dynamic)")
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, head_dim] in `dtype`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
