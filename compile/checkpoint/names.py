"""Checkpoint key -> canonical name (docs/CONTRACTS.md), for both formats and both -hf key layouts."""
from __future__ import annotations

import re
from typing import Optional


# ================================================================ key mapping

_HF_VISION_LAYER = [  # -hf vision layer suffix -> original suffix
    (r"lambda_(\d)$", r"ls\1"),
    (r"attention\.projection_layer\.", "attn.proj."),
    (r"attention\.(q_norm|k_norm)\.weight$", r"attn.\1.weight"),
    (r"layernorm_before\.", "norm1."),
    (r"layernorm_after\.", "norm2."),
    (r"(mlp\.fc[12]\.(weight|bias))$", r"\1"),
]
_INTERNLM2 = [  # InternLM2 suffix under language_model.model. -> canonical suffix under language_model.
    (r"tok_embeddings\.weight$", "embed_tokens.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight$", r"layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight$", r"layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight$", r"layers.\1.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight$", r"layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight$", r"layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight$", r"layers.\1.mlp.down_proj.weight"),
    (r"norm\.weight$", "norm.weight"),
]


def _sub_first(rules, s: str) -> Optional[str]:
    for pat, rep in rules:
        out, n = re.subn("^" + pat, rep, s)
        if n:
            return out
    return None


def _strip(key: str, prefixes) -> Optional[str]:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return None


def _map_key(key: str, fmt: str, arch: str):
    """One source key -> ("copy", canonical) | ("qkv", canonical_qkv, part) | ("wqkv", layer_prefix)
    | ("fused", module_prefix, "qkv" | "gate_up") (Phi-3) | ("skip",) | None (unexpected)."""
    if key.endswith("rotary_emb.inv_freq"):
        return ("skip",)  # a recomputed buffer some old checkpoints persist
    if fmt == "original":
        vis, proj, body, heads = ("vision_model.",), None, ("language_model.model.",), \
            {"language_model.output.weight" if arch == "internlm2" else "language_model.lm_head.weight"}
    else:
        vis, body = ("model.vision_tower.", "vision_tower."), ("model.language_model.", "language_model.model.")
        proj, heads = ("model.multi_modal_projector.", "multi_modal_projector."), \
            {"lm_head.weight", "language_model.lm_head.weight"}
    if key in heads:
        return ("copy", "language_model.lm_head.weight")
    rest = _strip(key, vis)
    if rest is not None:
        if fmt == "original":
            return ("copy", "vision_model." + rest)
        return _map_hf_vision(rest)
    if proj is None and key.startswith("mlp1."):
        return ("copy", key)
    rest = _strip(key, proj) if proj else None
    if rest is not None:
        m = re.match(r"(layer_norm|linear_1|linear_2)\.(weight|bias)$", rest)
        return ("copy", f"mlp1.{ {'layer_norm': 0, 'linear_1': 1, 'linear_2': 3}[m[1]] }.{m[2]}") if m else None
    rest = _strip(key, body)
    if rest is not None:
        if arch == "phi3":
            m = re.match(r"layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight$", rest)
            if m:
                kind = "qkv" if m[2].startswith("self_attn") else "gate_up"
                return ("fused", f"language_model.layers.{m[1]}.{m[2].split('.')[0]}.", kind)
        if arch != "internlm2":
            return ("copy", "language_model." + rest)
        m = re.match(r"layers\.(\d+)\.attention\.wqkv\.weight$", rest)
        if m:
            return ("wqkv", f"language_model.layers.{m[1]}.self_attn.")
        out = _sub_first(_INTERNLM2, rest)
        return ("copy", "language_model." + out) if out else None
    return None


def _map_hf_vision(rest: str):
    fixed = {"embeddings.cls_token": "embeddings.class_embedding",
             "embeddings.position_embeddings": "embeddings.position_embedding",
             "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
             "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias"}
    if rest in fixed:
        return ("copy", "vision_model." + fixed[rest])
    if rest == "embeddings.mask_token":
        return ("skip",)  # masked-image-modeling token, unused at inference
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)$", rest)
    if not m:
        return None
    p = f"vision_model.encoder.layers.{m[1]}."
    qkv = re.match(r"attention\.([qkv])_proj\.(weight|bias)$", m[2])
    if qkv:
        return ("qkv", p + f"attn.qkv.{qkv[2]}", "qkv".index(qkv[1]))
    out = _sub_first(_HF_VISION_LAYER, m[2])
    return ("copy", p + out) if out else None
