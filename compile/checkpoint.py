"""Read an InternVL checkpoint into the canonical config and weight names (docs/CONTRACTS.md).

Two source formats:
- OpenGVLab's original (`InternVLChatModel`): config.json with `vision_config`/`llm_config`,
  keys `vision_model.*`, `mlp1.{0,1,3}.*`, `language_model.model.*` and
  `language_model.output.weight` (InternLM2) or `language_model.lm_head.weight`.
  Phi-3 (InternVL2-4B) keeps its fused `qkv_proj` / `gate_up_proj`; they are split here into the
  canonical q/k/v and gate/up (the fusion passes fuse them again, per rank).
- transformers' native `-hf` format (`InternVLForConditionalGeneration`), in both key
  layouts: `model.vision_tower.* / model.multi_modal_projector.* / model.language_model.* /
  lm_head.weight` (transformers 5) and `vision_tower.* / multi_modal_projector.* /
  language_model.model.* / language_model.lm_head.weight` (4.5x).

Weights are read from safetensors only: pickled `.bin` files are refused, never loaded.
Every name, shape and architecture is checked before any tensor is read, and every
problem is a CheckpointError that names the key or architecture.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open

from internvl_aot.graphs.config import LLMConfig, ModelConfig, VisionConfig

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

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint this compiler cannot read: the message says which key, file or architecture."""


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


# ================================================================ safetensors files

def _weight_files(path: Path) -> list[Path]:
    index = _read_json(path / "model.safetensors.index.json")
    if index is not None:
        files = sorted({path / f for f in index["weight_map"].values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{path / 'model.safetensors.index.json'} names missing shard {f.name}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    pickled = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
    if pickled:
        raise CheckpointError(
            f"{path} has only pickled weights ({', '.join(pickled[:3])}); they are never unpickled here. "
            "Convert them to safetensors first, e.g. load the model once with transformers "
            "(trust_remote_code=True) and call save_pretrained(dir, safe_serialization=True).")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


class _SafetensorsReader:
    """Key -> file index over one or more safetensors files, opened lazily (mmap)."""

    def __init__(self, files: list[Path]):
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self.file_of: dict[str, Path] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                if k in self.file_of:
                    raise CheckpointError(f"key {k!r} is in both {self.file_of[k].name} and {f.name}")
                self.file_of[k] = f

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.file_of[key]].get_tensor(key)


# ================================================================ loading

def _fmt_keys(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _plan(keys, fmt: str, arch: str):
    """Source keys -> (canonical <- key copies, canonical qkv <- [q, k, v] keys,
    layer prefix <- packed wqkv key, (module prefix, kind) <- Phi-3 fused key, unexpected keys)."""
    copies: dict[str, str] = {}
    qkv_parts: dict[str, list] = {}
    wqkv: dict[str, str] = {}
    fused: dict[tuple, str] = {}
    unexpected = []
    for key in keys:
        m = _map_key(key, fmt, arch)
        if m is None:
            unexpected.append(key)
        elif m[0] == "copy":
            if m[1] in copies:
                raise CheckpointError(f"keys {copies[m[1]]!r} and {key!r} both map to {m[1]!r}")
            copies[m[1]] = key
        elif m[0] == "qkv":
            qkv_parts.setdefault(m[1], [None, None, None])[m[2]] = key
        elif m[0] == "wqkv":
            wqkv[m[1]] = key
        elif m[0] == "fused":
            fused[(m[1], m[2])] = key
    return copies, qkv_parts, wqkv, fused, unexpected


_FUSED_PARTS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def load_checkpoint(path: PathLike, dtype: Optional[torch.dtype] = None
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(canonical config, canonical state dict) of an InternVL checkpoint directory.

    `dtype` casts the floating tensors as they are read (None keeps the stored dtype).
    Names, shapes and completeness are all checked before any tensor is read.
    """
    path = Path(path)
    cfg = load_config(path)
    l = cfg.llm
    expected = canonical_shapes(cfg)
    reader = _SafetensorsReader(_weight_files(path))
    copies, qkv_parts, wqkv, fused, unexpected = _plan(reader.file_of, cfg.extra["format"], l.arch)

    produced = set(copies) | set(qkv_parts)
    for prefix in wqkv:
        produced |= {prefix + f"{n}_proj.weight" for n in "qkv"}
    fused_of: dict[str, tuple] = {}      # canonical name <- (fused key, kind, part index)
    for (prefix, kind), key in fused.items():
        for i, part in enumerate(_FUSED_PARTS[kind]):
            fused_of[prefix + part + ".weight"] = (key, kind, i)
    produced |= set(fused_of)
    tie_from_embed = ("language_model.lm_head.weight" not in produced and l.tie_word_embeddings
                      and "language_model.embed_tokens.weight" in produced)
    if tie_from_embed:
        produced.add("language_model.lm_head.weight")

    def source_of(canon: str) -> str:
        if canon in qkv_parts:
            return next(k for k in qkv_parts[canon] if k)
        if canon in fused_of:
            return fused_of[canon][0]
        return copies.get(canon, canon)

    unexpected += [source_of(c) for c in produced - set(expected)]
    if unexpected:
        raise CheckpointError(f"unexpected keys in {path}: {_fmt_keys(unexpected)}")
    missing = set(expected) - produced
    for canon, parts in qkv_parts.items():
        missing |= {canon.replace("attn.qkv", f"attention.{'qkv'[i]}_proj") for i, k in enumerate(parts) if k is None}
    if missing:
        raise CheckpointError(f"missing keys in {path} (canonical names): {_fmt_keys(missing)}")

    def check(key: str, want: tuple[int, ...]):
        got = reader.shape(key)
        if got != tuple(want):
            raise CheckpointError(f"shape mismatch for {key!r}: checkpoint {list(got)}, config expects {list(want)}")

    for canon, key in copies.items():
        check(key, expected[canon])
    for canon, parts in qkv_parts.items():
        for k in parts:
            check(k, (expected[canon][0] // 3,) + expected[canon][1:])
    rows = (l.num_heads + 2 * l.num_kv_heads) * l.head_dim
    for key in wqkv.values():
        check(key, (rows, l.hidden_size))
    for (prefix, kind), key in fused.items():
        check(key, (rows if kind == "qkv" else 2 * l.intermediate_size, l.hidden_size))

    def read(key: str) -> torch.Tensor:
        t = reader.get(key)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    state: dict[str, torch.Tensor] = {}
    for canon in expected:  # canonical order
        if canon in copies:
            state[canon] = read(copies[canon])
        elif canon in qkv_parts:
            state[canon] = torch.cat([read(k) for k in qkv_parts[canon]], dim=0)
        elif canon in fused_of:
            key, kind, i = fused_of[canon]
            t = reader.get(key)  # rows [q; k; v] (heads, kv heads, kv heads) or [gate; up]
            sizes = ([l.num_heads * l.head_dim] + [l.num_kv_heads * l.head_dim] * 2 if kind == "qkv"
                     else [l.intermediate_size] * 2)
            part = t.split(sizes, dim=0)[i].contiguous()
            state[canon] = part.to(dtype) if dtype is not None and part.is_floating_point() else part
        elif canon.endswith("self_attn.q_proj.weight") and canon[:-len("q_proj.weight")] in wqkv:
            prefix = canon[:-len("q_proj.weight")]
            q, k, v = unpack_wqkv(read(wqkv[prefix]), l.num_heads, l.num_kv_heads, l.head_dim)
            state[prefix + "q_proj.weight"], state[prefix + "k_proj.weight"], state[prefix + "v_proj.weight"] = q, k, v
    if tie_from_embed:
        state["language_model.lm_head.weight"] = state["language_model.embed_tokens.weight"].clone()
    return cfg, {k: state[k] for k in expected}


def unpack_wqkv(w: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's packed wqkv, rows grouped per KV head as (kv_heads, q_per_kv + 2, head_dim):
    q_per_kv query heads, then that group's key head, then its value head."""
    g = num_heads // num_kv_heads
    x = w.reshape(num_kv_heads, g + 2, head_dim, w.shape[-1])
    q = x[:, :g].reshape(num_heads * head_dim, -1).contiguous()
    k = x[:, g].reshape(num_kv_heads * head_dim, -1).contiguous()
    v = x[:, g + 1].reshape(num_kv_heads * head_dim, -1).contiguous()
    return q, k, v


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """The inverse of unpack_wqkv (used to write InternLM2-format test checkpoints)."""
    g, H = num_heads // num_kv_heads, q.shape[-1]
    return torch.cat([q.reshape(num_kv_heads, g, head_dim, H), k.reshape(num_kv_heads, 1, head_dim, H),
                      v.reshape(num_kv_heads, 1, head_dim, H)], dim=1).reshape(-1, H)


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
