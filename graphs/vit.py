"""InternViT: the vision encoder of InternVL (300M and 6B styles), as static-shape PyTorch.

300M style: LayerNorm, qkv bias, no qk-norm. 6B style: RMSNorm, no qkv bias, q and k
RMS-normalised over the full hidden width before the split into heads. Both use layer scale
(ls1/ls2), exact GELU, a CLS token and position embeddings for the 448 grid, no final norm.
Parameter names equal the OpenGVLab checkpoint's `vision_model.*` keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .norm import RMSNorm, make_norm


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
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        self.proj = nn.Linear(c, c)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(c, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(c, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.view(n, t, self.heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.empty(cfg.hidden_size))
        self.norm2 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.empty(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(num_layers))


class InternViT(nn.Module):
    """pixel_values [N, 3, 448, 448] -> hidden states of layer `select_layer` [N, 1 + patches, C].

    Only the layers up to `select_layer` are built (select_layer -1: all, -2: all but the last):
    the unused tail never runs and its weights never ship.
    """

    def __init__(self, cfg: VisionConfig, select_layer: int = -1):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg, used_vision_layers(cfg.num_layers, select_layer))

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
