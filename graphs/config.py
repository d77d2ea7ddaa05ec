"""Plain-data configuration of an InternVL model, as the graphs need it.

One canonical form for every checkpoint format (OpenGVLab original, transformers `-hf`)
and for registry entries. `to_dict`/`from_dict` round-trip through the artifact's
manifest, so the runtime can read the same fields without importing this module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    norm_type: str = "layer_norm"          # "layer_norm" (InternViT-300M) | "rms_norm" (InternViT-6B)
    qkv_bias: bool = True                  # 300M: True, 6B: False
    qk_normalization: bool = False         # 6B: RMSNorm over the full hidden width of q and k
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"               # exact (erf) GELU

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class LLMConfig:
    arch: str                              # "internlm2" | "llama" | "qwen2" | "qwen3" | "phi3" | "internlm3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 0                      # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"type": "dynamic"|"linear", "factor": f}, or {"type": "longrope", "short_factor": [...],
    # "long_factor": [...], "original_max_position_embeddings": n[, "factor", "attention_factor"]}, or None
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    qkv_bias: bool = False                 # Qwen2: True
    qk_norm: bool = False                  # Qwen3: RMSNorm over each q / k head (weight [head_dim])
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    """The whole VLM: vision tower + projector + LLM + the settings that shape its inputs."""
    name: str
    vision: VisionConfig
    llm: LLMConfig
    select_layer: int = -1                 # hidden state of this ViT layer feeds the projector
    ps_version: str = "v2"                 # pixel shuffle "v1" (transposes token order) | "v2"
    downsample_ratio: float = 0.5
    template: str = "internlm2-chat"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    # Token ids the runtime needs; filled from the tokenizer by the checkpoint loader.
    image_context_token_id: int = -1       # <IMG_CONTEXT>
    extra: dict = field(default_factory=dict)

    @property
    def num_image_token(self) -> int:
        """LLM tokens per 448 tile: 32x32 patches, pixel-shuffled by downsample_ratio."""
        grid = self.vision.image_size // self.vision.patch_size
        return int(grid * self.downsample_ratio) ** 2

    @property
    def projector_in(self) -> int:
        return int(self.vision.hidden_size * (1 / self.downsample_ratio) ** 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["vision"] = VisionConfig(**d["vision"])
        d["llm"] = LLMConfig(**d["llm"])
        return cls(**d)
