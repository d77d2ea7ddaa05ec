"""An artifact's weights as a transformers `InternVLForConditionalGeneration`.

The artifact stores exactly the tensors its graphs read: the canonical weights
(docs/CONTRACTS.md) after the fusion passes' re-layouts, plus derived constants. Undoing the
re-layouts gives back the canonical weights, bit for bit, in the artifact's dtype, whatever
the artifact's source was (a checkpoint or `WEIGHTS=random`):
- `<...>.self_attn.qkv_proj.{weight,bias}` = cat(q, k, v) rows (compile/passes/qkv_fusion.py);
- `<...>.mlp.gate_up_proj.weight` = cat(gate, up) rows (compile/passes/gate_up_fusion.py);
- derived constants (`_aoti.*`, rotary `inv_freq` / `cos_table` / `sin_table`) are dropped:
  transformers computes its own.
Anything else that is not a canonical name means a pass re-laid weights in a way this module
does not know: it says so rather than guess.

Canonical -> transformers 5 names (the inverse of compile/checkpoint.py's -hf reader): the ViT's
fused `attn.qkv` is split into q/k/v_proj, `ls1/ls2` -> `lambda_1/2`, `norm1/2` ->
`layernorm_before/after`, `mlp1.{0,1,3}` -> `multi_modal_projector.{layer_norm,linear_1,linear_2}`,
`language_model.*` -> `model.language_model.*` (InternLM2 is a Llama in transformers; its packed
wqkv is already unpacked in canonical form), `language_model.lm_head` -> `lm_head`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

DERIVED = re.compile(r"(^_aoti\.|(inv_freq|cos_table|sin_table)(\..*)?$)")


class WeightMappingError(ValueError):
    pass


def dequantized(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """QUANT=int8 artifacts (compile/passes/int8_weights.py): each `X.weight_int8` with its fp32 `X.weight_scale`
    becomes `X.weight` = q * scale (fp32): the int8-rounded weights the artifact computes with, so transformers
    runs the same model. The scales cast for ATen's int8 GEMM (`X.weight_scale_<dtype>`) are dropped. QUANT=int4
    (compile/passes/int4_weights.py): `X.weight_int4` with its `X.weight_scale_g<group>` likewise."""
    if not any(k.endswith((".weight_int8", ".weight_int4")) for k in weights):
        return weights
    from ..compile.passes.int4_weights import dequantize as dequantize_int4
    int4_scales = {m[1]: (k, int(m[2])) for k in weights if (m := re.fullmatch(r"(.*)_scale_g(\d+)", k))}
    out = {}
    for key, t in weights.items():
        if key.endswith(".weight_int8"):
            base = key[: -len("_int8")]
            out[base] = t.float() * weights[base + "_scale"].float()[:, None]
        elif key.endswith(".weight_int4"):
            base = key[: -len("_int4")]
            scale, group = int4_scales[base]
            out[base] = dequantize_int4(t, weights[scale].float(), group)
        elif not re.search(r"\.weight_scale(_\w+)?$", key):
            out[key] = t
    return out


def canonical_from_artifact(manifest: dict, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The artifact's weights -> canonical names and layouts (views where possible, no copies)."""
    from ..compile.checkpoint import canonical_shapes
    from ..graphs.config import ModelConfig

    if manifest.get("tp", 1) != 1:
        raise WeightMappingError("tensor-parallel artifact: rank 0 holds a shard only")
    cfg = ModelConfig.from_dict(manifest["model"]["config"])
    llm = cfg.llm
    q_rows, kv_rows = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    out = {}
    weights = dequantized(weights)
    for key, t in weights.items():
        if DERIVED.search(key):
            continue
        m = re.match(r"(.*\.self_attn\.)qkv_proj\.(weight|bias)$", key)
        if m:
            for name, part in zip("qkv", torch.split(t, [q_rows, kv_rows, kv_rows], dim=0)):
                out[f"{m[1]}{name}_proj.{m[2]}"] = part
            continue
        m = re.match(r"(.*\.mlp\.)gate_up_proj\.weight$", key)
        if m:
            gate, up = torch.split(t, t.shape[0] // 2, dim=0)
            out[m[1] + "gate_proj.weight"], out[m[1] + "up_proj.weight"] = gate, up
            continue
        out[key] = t
    expected = canonical_shapes(cfg)
    unknown = sorted(set(out) - set(expected))
    missing = sorted(set(expected) - set(out))
    bad = sorted(k for k in set(out) & set(expected) if tuple(out[k].shape) != tuple(expected[k]))
    if unknown or missing or bad:
        raise WeightMappingError(
            "cannot recover the canonical weights from the artifact "
            f"(unknown: {unknown[:4]}, missing: {missing[:4]}, wrong shape: {bad[:4]}); a compile pass "
            "re-lays weights in a way compile-agnostic un-fusing does not know")
    return out


_VISION_LAYER = [  # canonical suffix -> transformers suffix (vision encoder layer)
    (r"ls(\d)$", r"lambda_\1"),
    (r"attn\.proj\.(weight|bias)$", r"attention.projection_layer.\1"),
    (r"attn\.(q_norm|k_norm)\.weight$", r"attention.\1.weight"),
    (r"norm1\.(weight|bias)$", r"layernorm_before.\1"),
    (r"norm2\.(weight|bias)$", r"layernorm_after.\1"),
    (r"mlp\.(fc[12])\.(weight|bias)$", r"mlp.\1.\2"),
]
_FIXED = {
    "vision_model.embeddings.class_embedding": "model.vision_tower.embeddings.cls_token",
    "vision_model.embeddings.position_embedding": "model.vision_tower.embeddings.position_embeddings",
    "vision_model.embeddings.patch_embedding.weight": "model.vision_tower.embeddings.patch_embeddings.projection.weight",
    "vision_model.embeddings.patch_embedding.bias": "model.vision_tower.embeddings.patch_embeddings.projection.bias",
    "language_model.lm_head.weight": "lm_head.weight",
}
_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


def canonical_to_hf(canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in canonical.items():
        if key in _FIXED:
            out[_FIXED[key]] = t
            continue
        m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.*)$", key)
        if m:
            prefix = f"model.vision_tower.encoder.layer.{m[1]}."
            qkv = re.match(r"attn\.qkv\.(weight|bias)$", m[2])
            if qkv:
                for name, part in zip("qkv", torch.chunk(t, 3, dim=0)):
                    out[f"{prefix}attention.{name}_proj.{qkv[1]}"] = part
                continue
            for pat, rep in _VISION_LAYER:
                new, n = re.subn("^" + pat, rep, m[2])
                if n:
                    out[prefix + new] = t
                    break
            else:
                raise WeightMappingError(f"no transformers name for {key}")
            continue
        m = re.match(r"mlp1\.(\d)\.(weight|bias)$", key)
        if m:
            out[f"model.multi_modal_projector.{_PROJECTOR[m[1]]}.{m[2]}"] = t
            continue
        if key.startswith("language_model."):
            out["model." + key] = t
            continue
        raise WeightMappingError(f"no transformers name for {key}")
    return out


def hf_config(manifest: dict, attn_implementation: str = "sdpa"):
    """transformers' InternVLConfig for the artifact's model config."""
    from transformers import InternVLConfig, LlamaConfig, Qwen2Config

    c = manifest["model"]["config"]
    llm, vis = c["llm"], c["vision"]
    common = dict(vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
                  intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_layers"],
                  num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"],
                  head_dim=llm["head_dim"], rms_norm_eps=llm["rms_norm_eps"], rope_theta=llm["rope_theta"],
                  max_position_embeddings=llm["max_position_embeddings"], tie_word_embeddings=False,
                  hidden_act="silu")
    if llm.get("rope_scaling"):
        common["rope_scaling"] = {"type": llm["rope_scaling"]["type"], "factor": llm["rope_scaling"]["factor"]}
    if llm["arch"] in ("internlm2", "llama"):
        if llm.get("qkv_bias"):
            raise WeightMappingError("a Llama-style backbone with q/k/v bias has no transformers equivalent")
        text = LlamaConfig(attention_bias=False, **common)
    elif llm["arch"] == "qwen2":
        text = Qwen2Config(use_sliding_window=False, **common)
    else:
        raise WeightMappingError(f"no transformers backbone for arch {llm['arch']!r}")
    vision = dict(hidden_size=vis["hidden_size"], num_attention_heads=vis["num_heads"],
                  intermediate_size=vis["intermediate_size"], num_hidden_layers=vis["num_layers"],
                  image_size=vis["image_size"], patch_size=vis["patch_size"], layer_norm_eps=vis["layer_norm_eps"],
                  norm_type=vis["norm_type"], attention_bias=vis["qkv_bias"], use_qk_norm=vis["qk_normalization"],
                  hidden_act=vis["hidden_act"])
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=c["image_context_token_id"],
                         downsample_ratio=c["downsample_ratio"], projector_hidden_act="gelu",
                         vision_feature_layer=c["select_layer"], vision_feature_select_strategy="default",
                         tie_word_embeddings=False)  # top level: transformers 5 ties otherwise
    cfg._attn_implementation = attn_implementation
    return cfg


def build_hf_model(artifact: Path, manifest: dict, dtype: torch.dtype, attn_implementation: str = "sdpa",
                   device: str = "cpu", canonical: dict | None = None):
    """InternVLForConditionalGeneration holding the artifact's weights (cast to `dtype`), eval mode.

    Every parameter is written by name and checked (transformers 5 can silently leave tied or
    unexpected parameters at their initial values)."""
    from ..runtime import weights_file
    from transformers import InternVLForConditionalGeneration
    from transformers.initialization import no_init_weights

    if manifest["model"]["config"].get("ps_version", "v2") != "v2":
        print("warning: transformers' InternVL implements pixel shuffle v2 only; this model uses "
              f"{manifest['model']['config']['ps_version']}, so its image features differ", flush=True)
    if canonical is None:
        weights = weights_file.read(Path(artifact) / manifest["ranks"][0]["weights"])
        canonical = canonical_from_artifact(manifest, weights)
    state = canonical_to_hf(canonical)
    cfg = hf_config(manifest, attn_implementation)
    with no_init_weights():
        model = InternVLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    params = dict(model.named_parameters())
    if set(params) != set(state):
        raise WeightMappingError(f"transformers parameters differ from the mapped weights: "
                                 f"{sorted(set(params) ^ set(state))[:6]}")
    with torch.no_grad():
        for name, p in params.items():
            src = state[name]
            if tuple(p.shape) != tuple(src.shape):
                raise WeightMappingError(f"{name}: transformers {tuple(p.shape)}, artifact {tuple(src.shape)}")
            p.copy_(src)
    del state, canonical
    return model.to(device).eval()
