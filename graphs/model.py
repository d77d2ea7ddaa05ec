"""InternVL wired from its parts, and the three stage modules that get exported.

Each stage is an nn.Module whose forward takes only tensors (docs/CONTRACTS.md). They share
one InternVL instance, so their parameter names are the canonical weight names and every
stage of one rank reads the same weight tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .decoder import LanguageModel
from .parallel import SINGLE, TPInfo
from .projector import Projector, vit_tokens_to_llm
from .rotary import rotary_embedding
from .vit import InternViT


class InternVL(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo = SINGLE, max_seq_len: int = 0):
        super().__init__()
        self.cfg = cfg
        self.vision_model = InternViT(cfg.vision, cfg.select_layer, tp)
        self.mlp1 = Projector(cfg.projector_in, cfg.llm.hidden_size, tp)
        self.language_model = LanguageModel(cfg.llm, tp, max_seq_len)


class VisionStage(nn.Module):
    """pixel_values [N, 3, 448, 448] -> image embeddings [N, 256, H]."""

    def __init__(self, model: InternVL):
        super().__init__()
        self.vision_model, self.mlp1 = model.vision_model, model.mlp1
        self.scale, self.ps_version = model.cfg.downsample_ratio, model.cfg.ps_version

    def forward(self, pixel_values):
        return vit_tokens_to_llm(self.vision_model(pixel_values), self.mlp1, self.scale, self.ps_version)


class PrefillStage(nn.Module):
    def __init__(self, model: InternVL):
        super().__init__()
        self.language_model = model.language_model

    def forward(self, input_ids, positions, image_embeds, image_mask, slot_mapping, block_table, last_index,
                k_cache, v_cache):
        return self.language_model.prefill(input_ids, positions, image_embeds, image_mask, slot_mapping,
                                           block_table, last_index, k_cache, v_cache)


class DecodeStage(nn.Module):
    def __init__(self, model: InternVL):
        super().__init__()
        self.language_model = model.language_model

    def forward(self, input_ids, positions, slot_mapping, block_tables, k_cache, v_cache):
        return self.language_model.decode(input_ids, positions, slot_mapping, block_tables, k_cache, v_cache)


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], tp: TPInfo = SINGLE,
                max_seq_len: int = 0) -> InternVL:
    """An InternVL module holding exactly `weights` (no copies; names per docs/CONTRACTS.md).

    Vision layers past `select_layer` are not built, so their weights are dropped here.
    Any other missing or unexpected name is an error. With tensor parallelism, `weights` are
    one rank's shard (compile/tp.py), including the rank's persistent buffers (vocab offsets).
    """
    with torch.device("meta"):
        model = InternVL(cfg, tp, max_seq_len)
    expected = dict(model.state_dict(keep_vars=True))
    used = {k: v for k, v in weights.items() if k in expected}
    dropped = [k for k in weights if k not in expected and not _is_unused_vision_layer(k, model)]
    missing = [k for k in expected if k not in weights]
    if missing or dropped:
        raise KeyError(f"weights do not match the model: missing {missing[:5]}, unexpected {dropped[:5]}")
    for name, t in used.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} != expected {tuple(expected[name].shape)}")
    model.load_state_dict(used, strict=False, assign=True)
    # The rotary frequencies are non-persistent buffers, still on the meta device: rebuild them.
    llm = cfg.llm
    model.language_model.rotary = rotary_embedding(
        llm.head_dim, llm.rope_theta, llm.rope_scaling, llm.max_position_embeddings,
        max_seq_len or llm.max_position_embeddings).to(model.language_model.embed_tokens.weight.device)
    return model.eval()


def _is_unused_vision_layer(name: str, model: InternVL) -> bool:
    prefix = "vision_model.encoder.layers."
    if not name.startswith(prefix):
        return False
    return int(name[len(prefix):].split(".")[0]) >= len(model.vision_model.encoder.layers)
