"""Pixel shuffle and the `mlp1` projector that map ViT tokens to LLM embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import SINGLE, ColumnParallelLinear, RowParallelLinear, TPInfo


def pixel_shuffle(x: torch.Tensor, scale: float, version: str) -> torch.Tensor:
    """x [N, w, h, C] -> [N, w*scale, h*scale, C/scale^2], InternVL's exact token order.

    v1 (InternVL-Chat-V1-2) skips the final transpose, so its tokens come out transposed.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version == "v1":
        return x
    if version != "v2":
        raise ValueError(f"unknown pixel shuffle version {version!r} (expected 'v1' or 'v2')")
    return x.permute(0, 2, 1, 3).contiguous()


class Projector(nn.Sequential):
    """mlp1: LayerNorm(4C), Linear(4C, H), GELU, Linear(H, H); indices 0, 1, 3 as in checkpoints.

    Tensor parallel (docs/CONTRACTS.md): the middle width may be zero-padded to a multiple of
    the world size; that is exact because GELU(0) = 0 and the padded columns of mlp1.3 are zero."""

    def __init__(self, in_dim: int, llm_hidden: int, tp: TPInfo = SINGLE):
        inner = tp.padded(llm_hidden)
        super().__init__(nn.LayerNorm(in_dim), ColumnParallelLinear(in_dim, inner, True, tp), nn.GELU(),
                         RowParallelLinear(inner, llm_hidden, True, tp))


def vit_tokens_to_llm(vit_out: torch.Tensor, projector: Projector, scale: float, version: str) -> torch.Tensor:
    """[N, 1 + g*g, C] ViT output -> [N, g*g*scale^2, H] LLM embeddings (drops the CLS token)."""
    x = vit_out[:, 1:, :]
    n, t, c = x.shape
    g = int(t ** 0.5)
    x = pixel_shuffle(x.reshape(n, g, g, c), scale, version)
    return projector(x.reshape(n, -1, x.shape[-1]))
