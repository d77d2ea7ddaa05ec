"""config.json of either format (original OpenGVLab, transformers -hf) -> ModelConfig; the architectures read and refused."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from internvl_aot.graphs.config import LLMConfig, ModelConfig, VisionConfig
from .errors import CheckpointError, PathLike


IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
SUPPORTED_ROPE_TYPES = ("dynamic", "linear", "longrope")
# LLM architectures (original format: llm_config.architectures[0]) -> canonical arch.
# InternLM3 (InternVL3-9B) has Llama's module names and math (separate q/k/v, no bias, dynamic NTK RoPE).
_ARCHS = {"InternLM2ForCausalLM": "internlm2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
          "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "InternLM3ForCausalLM": "internlm3"}
_HF_TEXT_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
# Known but not supported yet: one message for both formats (README says the same).
MOE_UNSUPPORTED = ("mixture-of-experts language models (InternVL3.5-30B-A3B / 241B-A28B: Qwen3-MoE; "
                   "InternVL3.5-GPT-OSS-20B-A4B: GPT-OSS) are not supported yet")
_MOE_ARCHS = {"Qwen3MoeForCausalLM", "GptOssForCausalLM", "Qwen2MoeForCausalLM"}
_MOE_TEXT_TYPES = {"qwen3_moe", "gpt_oss", "qwen2_moe"}

# ================================================================ config

def _rope(d: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) from a 4.x (`rope_theta`/`rope_scaling`) or 5.x (`rope_parameters`) config."""
    params = d.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = d.get("rope_scaling")
    if params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if not scaling:
        return theta, None
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind in (None, "default"):
        return theta, None
    if kind == "su":  # Phi-3's first name for LongRoPE (InternVL2-4B's config)
        kind = "longrope"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"unsupported rope scaling type {kind!r} (supported: {SUPPORTED_ROPE_TYPES})")
    if kind != "longrope":
        return theta, {"type": kind, "factor": float(scaling["factor"])}
    # Phi-3 keeps original_max_position_embeddings at the top level of its config (it wins there,
    # as in transformers); 5.x configs also copy it into rope_parameters.
    original = d.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    if not original or "short_factor" not in scaling or "long_factor" not in scaling:
        raise CheckpointError("longrope scaling needs short_factor, long_factor and original_max_position_embeddings")
    out = {"type": "longrope", "short_factor": [float(x) for x in scaling["short_factor"]],
           "long_factor": [float(x) for x in scaling["long_factor"]],
           "original_max_position_embeddings": int(original)}
    for k in ("factor", "attention_factor"):
        if scaling.get(k) is not None:
            out[k] = float(scaling[k])
    return theta, out


def _llm_config(d: dict, arch: str, tie: bool) -> LLMConfig:
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported LLM activation {d['hidden_act']!r} (only silu)")
    if arch == "internlm2" and d.get("bias", False):
        raise CheckpointError("InternLM2 with bias=True (biased wqkv/wo) is not supported")
    if arch == "llama" and (d.get("attention_bias") or d.get("mlp_bias")):
        raise CheckpointError("Llama with attention_bias/mlp_bias is not supported")
    if arch in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        raise CheckpointError(f"{arch} with use_sliding_window=True is not supported")
    if arch == "qwen3" and (d.get("attention_bias") or d.get("mlp_bias")):
        raise CheckpointError("Qwen3 with attention_bias=True is not supported")
    if arch == "internlm3" and (d.get("bias") or d.get("qkv_bias")):
        raise CheckpointError("InternLM3 with bias/qkv_bias=True is not supported")
    if arch == "phi3":
        window = d.get("sliding_window")
        if window is not None and window < d.get("max_position_embeddings", 4096):
            raise CheckpointError(f"Phi-3 with sliding_window {window} < max_position_embeddings is not supported")
    params = d.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0, 1):
        raise CheckpointError(f"partial_rotary_factor {partial} is not supported (only 1.0)")
    theta, scaling = _rope(d)
    heads = d["num_attention_heads"]
    return LLMConfig(
        arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        intermediate_size=d["intermediate_size"], head_dim=d.get("head_dim") or 0,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        qkv_bias=(arch == "qwen2"), qk_norm=(arch == "qwen3"), tie_word_embeddings=tie)


def _square(x) -> int:
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise CheckpointError(f"non-square image/patch size {x} is not supported")
        return int(x[0])
    return int(x)


def _config_original(c: dict, path: Path) -> ModelConfig:
    v, lc = c["vision_config"], c["llm_config"]
    arch_name = (lc.get("architectures") or ["?"])[0]
    if arch_name in _MOE_ARCHS:
        raise CheckpointError(f"{arch_name} in {path / 'config.json'}: {MOE_UNSUPPORTED}")
    if arch_name not in _ARCHS:
        raise CheckpointError(f"unsupported LLM architecture {arch_name!r} in {path / 'config.json'} "
                              f"(supported: {', '.join(_ARCHS)})")
    arch = _ARCHS[arch_name]
    # Read here: hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, image_size, patch_size,
    # norm_type, qkv_bias, qk_normalization, layer_norm_eps, hidden_act (+ select_layer, ps_version,
    # downsample_ratio at the top level). drop_path_rate / dropout only act in training; InternVL3's ViT
    # configs also carry MoE fields (num_experts, ...) that only matter with use_moe, which is refused.
    if v.get("use_moe"):
        raise CheckpointError(f"vision_config.use_moe=True in {path / 'config.json'}: a mixture-of-experts "
                              "InternViT is not supported")
    # Defaults below are InternVisionConfig's / InternVLChatConfig's, for configs that omit a field.
    image_size = _square(v.get("image_size", 224))
    force = c.get("force_image_size")
    if force and int(force) != image_size:
        raise CheckpointError(f"force_image_size {force} != vision_config.image_size {image_size}: "
                              "interpolated position embeddings are not supported")
    vision = VisionConfig(
        hidden_size=v.get("hidden_size", 3200), num_layers=v.get("num_hidden_layers", 48),
        num_heads=v.get("num_attention_heads", 25), intermediate_size=v.get("intermediate_size", 12800),
        image_size=image_size, patch_size=_square(v.get("patch_size", 14)),
        norm_type=v.get("norm_type", "rms_norm"), qkv_bias=bool(v.get("qkv_bias", False)),
        qk_normalization=bool(v.get("qk_normalization", True)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)), hidden_act=v.get("hidden_act", "gelu"))
    template = c.get("template")
    extra = {"format": "original", "source_arch": arch_name}
    if not template:
        template = {"internlm2": "internlm2-chat", "phi3": "phi3-chat", "qwen3": "internvl2_5",
                    "internlm3": "internvl2_5"}.get(arch, "Hermes-2")
    return ModelConfig(
        name=path.name, vision=vision, llm=_llm_config(lc, arch, bool(lc.get("tie_word_embeddings", False))),
        select_layer=c.get("select_layer", -1), ps_version=c.get("ps_version", "v1"),
        downsample_ratio=float(c.get("downsample_ratio", 0.5)), template=template,
        dynamic_image_size=bool(c.get("dynamic_image_size", False)),
        use_thumbnail=bool(c.get("use_thumbnail", False)),
        min_dynamic_patch=c.get("min_dynamic_patch", 1), max_dynamic_patch=c.get("max_dynamic_patch", 6),
        image_context_token_id=_or_minus_one(find_image_context_token_id(path)), extra=extra)


def _config_hf(c: dict, path: Path) -> ModelConfig:
    v, t = c.get("vision_config") or {}, c.get("text_config") or {}
    text_type = t.get("model_type", "qwen2")
    if text_type in _MOE_TEXT_TYPES:
        raise CheckpointError(f"language model type {text_type!r} in {path / 'config.json'}: {MOE_UNSUPPORTED}")
    if text_type not in _HF_TEXT_TYPES:
        raise CheckpointError(f"unsupported language model type {text_type!r} in {path / 'config.json'} "
                              f"(supported: {', '.join(_HF_TEXT_TYPES)})")
    layer = c.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise CheckpointError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    if c.get("vision_feature_select_strategy", "default") != "default":
        raise CheckpointError("only vision_feature_select_strategy 'default' (drop CLS) is supported")
    if c.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"unsupported projector activation {c['projector_hidden_act']!r}")
    if not v.get("use_mean_pooling", True):
        raise CheckpointError("vision_config.use_mean_pooling=False (a final vision LayerNorm) is not supported")
    vision = VisionConfig(
        hidden_size=v.get("hidden_size", 1024), num_layers=v.get("num_hidden_layers", 24),
        num_heads=v.get("num_attention_heads", 16), intermediate_size=v.get("intermediate_size", 4096),
        image_size=_square(v.get("image_size", 448)), patch_size=_square(v.get("patch_size", 14)),
        norm_type=v.get("norm_type", "layer_norm"), qkv_bias=bool(v.get("attention_bias", False)),
        qk_normalization=bool(v.get("use_qk_norm", False)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)), hidden_act=v.get("hidden_act", "gelu"))
    # transformers 5 ties lm_head to embed_tokens unless the top-level config says otherwise.
    tie = bool(c.get("tie_word_embeddings", t.get("tie_word_embeddings", True)))
    pre = _read_json(path / "preprocessor_config.json") or {}
    dynamic = bool(pre.get("crop_to_patches", True))
    image_token_id = c.get("image_token_id", 151667)
    tok_id = find_image_context_token_id(path)
    if tok_id is not None and tok_id != image_token_id:
        raise CheckpointError(f"config image_token_id {image_token_id} != tokenizer's {IMG_CONTEXT_TOKEN} id {tok_id}")
    return ModelConfig(
        name=path.name, vision=vision, llm=_llm_config(t, _HF_TEXT_TYPES[text_type], tie),
        select_layer=layer, ps_version="v2", downsample_ratio=float(c.get("downsample_ratio", 0.5)),
        # -hf checkpoints are conversions of InternVL2.5/3/3.5, whose template is internvl2_5 (ChatML);
        # a Phi-3 one could only be InternVL2-4B's, whose template is phi3-chat.
        template="phi3-chat" if text_type == "phi3" else "internvl2_5", dynamic_image_size=dynamic, use_thumbnail=dynamic,
        min_dynamic_patch=pre.get("min_patches", 1), max_dynamic_patch=pre.get("max_patches", 12),
        image_context_token_id=image_token_id, extra={"format": "hf", "source_arch": text_type})


def _or_minus_one(x: Optional[int]) -> int:
    return -1 if x is None else x


def _read_json(p: Path) -> Optional[dict]:
    return json.loads(p.read_text()) if p.is_file() else None


def load_config(path: PathLike) -> ModelConfig:
    """The canonical config of a checkpoint directory (reads only config and tokenizer files)."""
    path = Path(path)
    c = _read_json(path / "config.json")
    if c is None:
        raise CheckpointError(f"no config.json in {path}")
    if c.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in (c.get("architectures") or []):
        cfg = _config_hf(c, path)
    elif "llm_config" in c and "vision_config" in c:
        cfg = _config_original(c, path)
    else:
        raise CheckpointError(f"{path / 'config.json'} is neither an OpenGVLab InternVL (llm_config/vision_config) "
                              f"nor a transformers InternVL (model_type 'internvl') config")
    n = cfg.vision.num_layers  # hidden_states[select_layer] of (embeddings, layer 1, ..., layer n)
    if not -(n + 1) <= cfg.select_layer <= n:
        raise CheckpointError(f"select_layer {cfg.select_layer} is out of range for {n} vision layers")
    return cfg


def find_image_context_token_id(path: PathLike) -> Optional[int]:
    """The id of <IMG_CONTEXT> from the tokenizer files in `path`, or None if none says."""
    path = Path(path)
    tc = _read_json(path / "tokenizer_config.json") or {}
    for i, tok in (tc.get("added_tokens_decoder") or {}).items():
        if tok.get("content") == IMG_CONTEXT_TOKEN:
            return int(i)
    added = _read_json(path / "added_tokens.json") or {}
    if IMG_CONTEXT_TOKEN in added:
        return int(added[IMG_CONTEXT_TOKEN])
    tj = _read_json(path / "tokenizer.json") or {}
    for tok in tj.get("added_tokens") or []:
        if tok.get("content") == IMG_CONTEXT_TOKEN:
            return int(tok["id"])
    vocab = (tj.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and IMG_CONTEXT_TOKEN in vocab:
        return int(vocab[IMG_CONTEXT_TOKEN])
    return None
