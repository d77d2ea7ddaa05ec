"""InternViT: the vision encoder of InternVL (300M and 6B styles), as static-shape PyTorch.

300M style: LayerNorm, qkv bias, no qk-norm. 6B style: RMSNorm, no qkv bias, q and k
RMS-normalised over the full hidden width before the split into heads. Both use layer scale
(ls1/ls2), exact GELU, a CLS token and position embeddings for the 448 grid, no final norm.
Parameter names equal the OpenGVLab checkpoint's `vision_model.*` keys.

Tensor parallel (world size > 1; the sharding rules are in docs/CONTRACTS.md): a padded head
has zero q/k/v weights, so it attends uniformly over zero values and its zero output columns
add nothing. The 6B qk-norm needs the sum of squares
over the full width: each rank sums its slice, one all-reduce adds q's and k's sums, and
the mean divides by the real width (padding contributes zeros).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .norm import RMSNorm, make_norm
from .parallel import SINGLE, ColumnParallelLinear, RowParallelLinear, TPInfo, all_reduce


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, cfg.num_patches + 1, c))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)                                   # [N, patches, C]
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: TPInfo = SINGLE):
        super().__init__()
        c = cfg.hidden_size
        self.tp, self.full_width, self.eps = tp, c, cfg.layer_norm_eps
        self.heads = tp.padded(cfg.num_heads) // tp.world_size       # this rank's (padded) heads
        self.head_dim = cfg.head_dim
        self.width = self.heads * self.head_dim                        # c when world size is 1
        padded = tp.padded(cfg.num_heads) * self.head_dim
        self.qkv = ColumnParallelLinear(c, 3 * padded, cfg.qkv_bias, tp)
        self.proj = RowParallelLinear(padded, c, True, tp)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(self.width, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(self.width, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).split(self.width, dim=-1)
        if self.qk_normalization:
            if self.tp.world_size == 1:
                q, k = self.q_norm(q), self.k_norm(k)
            else:
                q, k = self._sharded_qk_norm(q, k)
        q, k, v = (y.view(n, t, self.heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, self.width))

    def _sharded_qk_norm(self, q: torch.Tensor, k: torch.Tensor):
        """RMSNorm over the full hidden width of q and k, each rank holding a slice of it
        (graphs/norm.py's formulation: fp32 statistics, cast back, then the weight)."""
        qf, kf = q.float(), k.float()
        sums = torch.stack([qf.pow(2).sum(-1), kf.pow(2).sum(-1)], dim=-1)   # [n, t, 2] partial
        mean = all_reduce(sums, self.tp) / self.full_width
        r = torch.rsqrt(mean + self.eps)
        q = self.q_norm.weight * (qf * r[..., 0:1]).to(q.dtype)
        k = self.k_norm.weight * (kf * r[..., 1:2]).to(k.dtype)
        return q, k


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: TPInfo = SINGLE):
        super().__init__()
        inner = tp.padded(cfg.intermediate_size)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, inner, True, tp)
        self.fc2 = RowParallelLinear(inner, cfg.hidden_size, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, tp: TPInfo = SINGLE):
        super().__init__()
        self.norm1 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg, tp)
        self.ls1 = nn.Parameter(torch.empty(cfg.hidden_size))
        self.norm2 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg, tp)
        self.ls2 = nn.Parameter(torch.empty(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int, tp: TPInfo = SINGLE):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, tp) for _ in range(num_layers))


class InternViT(nn.Module):
    """pixel_values [N, 3, 448, 448] -> hidden states of layer `select_layer` [N, 1 + patches, C].

    Only the layers up to `select_layer` are built (select_layer -1: all, -2: all but the last):
    the unused tail never runs and its weights never ship.
    """

    def __init__(self, cfg: VisionConfig, select_layer: int = -1, tp: TPInfo = SINGLE):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg, used_vision_layers(cfg.num_layers, select_layer), tp)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


def used_vision_layers(num_layers: int, select_layer: int) -> int:
    """hidden_states[select_layer] of a ViT with num_layers layers (index 0 = embeddings)."""
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise ValueError(f"select_layer {select_layer} out of range for a {num_layers}-layer ViT")
    return index
