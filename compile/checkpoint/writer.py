"""Writing checkpoints: the original OpenGVLab format from a transformers -hf one, sharded weights,
the other -hf key layout. The tests build their tiny checkpoints with it and tools/ write the demo
model and tiny checkpoints with it.

The -hf -> original conversion is written independently of the loader in this package (explicit
per-head row copies for InternLM2's packed wqkv, its own name tables), so that the loader's tests,
which read what this writes, are not circular.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# InternVL's added tokens, in the order the released tokenizers list them after the base vocabulary.
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


def _copy_tokenizer(src: Path, dst: Path):
    for name in ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                 "added_tokens.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def read_safetensors_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ================================================================ -hf -> original

def pack_wqkv_by_hand(q, k, v, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """InternLM2's wqkv rows: for each KV head, its q_per_kv query heads, then its k head,
    then its v head (written row block by row block, independently of the loader)."""
    g = num_heads // num_kv_heads
    blocks = []
    for j in range(num_kv_heads):
        for i in range(g):
            h = j * g + i
            blocks.append(q[h * head_dim:(h + 1) * head_dim])
        blocks.append(k[j * head_dim:(j + 1) * head_dim])
        blocks.append(v[j * head_dim:(j + 1) * head_dim])
    return torch.cat(blocks, dim=0)


_VISION_LAYER_TO_ORIGINAL = {
    "lambda_1": "ls1", "lambda_2": "ls2",
    "attention.projection_layer.weight": "attn.proj.weight", "attention.projection_layer.bias": "attn.proj.bias",
    "attention.q_norm.weight": "attn.q_norm.weight", "attention.k_norm.weight": "attn.k_norm.weight",
    "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_INTERNLM2_LAYER = {
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attention.wo.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
}


def hf_state_to_original(sd: dict, hf_cfg: dict, flavour: str) -> dict[str, torch.Tensor]:
    """transformers-5 -hf keys -> OpenGVLab keys (the inverse of transformers' converter)."""
    v, t = hf_cfg["vision_config"], hf_cfg["text_config"]
    out: dict[str, torch.Tensor] = {}
    out["vision_model.embeddings.class_embedding"] = sd["model.vision_tower.embeddings.cls_token"]
    out["vision_model.embeddings.position_embedding"] = sd["model.vision_tower.embeddings.position_embeddings"]
    for n in ("weight", "bias"):
        out[f"vision_model.embeddings.patch_embedding.{n}"] = \
            sd[f"model.vision_tower.embeddings.patch_embeddings.projection.{n}"]
    for i in range(v["num_hidden_layers"]):
        src, dst = f"model.vision_tower.encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        for n in ("weight", "bias"):
            if src + f"attention.q_proj.{n}" in sd:
                out[dst + f"attn.qkv.{n}"] = torch.cat([sd[src + f"attention.{x}_proj.{n}"] for x in "qkv"])
        for a, b in _VISION_LAYER_TO_ORIGINAL.items():
            if src + a in sd:
                out[dst + b] = sd[src + a]
    for a, b in (("layer_norm", 0), ("linear_1", 1), ("linear_2", 3)):
        for n in ("weight", "bias"):
            out[f"mlp1.{b}.{n}"] = sd[f"model.multi_modal_projector.{a}.{n}"]
    lm = {k[len("model.language_model."):]: x for k, x in sd.items() if k.startswith("model.language_model.")}
    if flavour in ("llama", "qwen2", "qwen3", "phi3"):  # Phi-3 keeps its fused qkv_proj / gate_up_proj
        out.update({"language_model.model." + k: x for k, x in lm.items()})
        out["language_model.lm_head.weight"] = sd["lm_head.weight"]
        return out
    heads, kv = t["num_attention_heads"], t["num_key_value_heads"]
    hd = t["hidden_size"] // heads
    out["language_model.model.tok_embeddings.weight"] = lm["embed_tokens.weight"]
    out["language_model.model.norm.weight"] = lm["norm.weight"]
    out["language_model.output.weight"] = sd["lm_head.weight"]
    for i in range(t["num_hidden_layers"]):
        src, dst = f"layers.{i}.", f"language_model.model.layers.{i}."
        out[dst + "attention.wqkv.weight"] = pack_wqkv_by_hand(
            *(lm[src + f"self_attn.{x}_proj.weight"] for x in "qkv"), heads, kv, hd)
        for a, b in _INTERNLM2_LAYER.items():
            out[dst + b] = lm[src + a]
    return out


def original_config(hf_cfg: dict, flavour: str, template: str) -> dict:
    """A config.json shaped like a real OpenGVLab InternVL2 one."""
    v, t = hf_cfg["vision_config"], hf_cfg["text_config"]
    rope = t.get("rope_parameters") or {}
    common = dict(hidden_act="silu", hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                  initializer_range=0.02, max_position_embeddings=t["max_position_embeddings"],
                  num_attention_heads=t["num_attention_heads"], num_hidden_layers=t["num_hidden_layers"],
                  num_key_value_heads=t["num_key_value_heads"], rms_norm_eps=t["rms_norm_eps"],
                  rope_theta=rope.get("rope_theta", t.get("rope_theta")), tie_word_embeddings=False,
                  torch_dtype="float32", use_cache=True, vocab_size=t["vocab_size"],
                  bos_token_id=t.get("bos_token_id"), eos_token_id=t.get("eos_token_id"))
    scaling = None
    if rope.get("rope_type", "default") in ("dynamic", "linear"):
        scaling = {"factor": rope["factor"], "type": rope["rope_type"]}
    if flavour == "internlm2":
        llm = dict(common, _name_or_path="internlm/internlm2-chat-tiny", architectures=["InternLM2ForCausalLM"],
                   model_type="internlm2", bias=False, attn_implementation="eager", pad_token_id=2,
                   rope_scaling=scaling, auto_map={
                       "AutoConfig": "configuration_internlm2.InternLM2Config",
                       "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                       "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    elif flavour == "llama":
        llm = dict(common, _name_or_path="NousResearch/Nous-Hermes-2-tiny", architectures=["LlamaForCausalLM"],
                   model_type="llama", attention_bias=False, pretraining_tp=1, rope_scaling=scaling)
    elif flavour == "qwen3":
        llm = dict(common, _name_or_path="Qwen/Qwen3-tiny", architectures=["Qwen3ForCausalLM"],
                   model_type="qwen3", head_dim=t["head_dim"], attention_bias=False, use_sliding_window=False,
                   sliding_window=None, max_window_layers=t["num_hidden_layers"], attention_dropout=0.0,
                   rope_scaling=scaling)
    elif flavour == "phi3":
        # InternVL2-4B's llm_config style: LongRoPE as rope_scaling type "su", original_max_position_embeddings
        # at the top level, a sliding_window larger than the context.
        llm = dict(common, _name_or_path="microsoft/Phi-3-tiny-128k-instruct", architectures=["Phi3ForCausalLM"],
                   model_type="phi3", original_max_position_embeddings=t["original_max_position_embeddings"],
                   sliding_window=2 * t["max_position_embeddings"], embd_pdrop=0.0, resid_pdrop=0.0,
                   attention_dropout=0.0, rope_scaling={"type": "su", "short_factor": rope["short_factor"],
                                                        "long_factor": rope["long_factor"]})
    else:
        llm = dict(common, _name_or_path="Qwen/Qwen2-tiny-Instruct", architectures=["Qwen2ForCausalLM"],
                   model_type="qwen2", use_sliding_window=False, sliding_window=32768,
                   max_window_layers=t["num_hidden_layers"], attention_dropout=0.0, rope_scaling=scaling)
    image = v["image_size"][0] if isinstance(v["image_size"], list) else v["image_size"]
    patch = v["patch_size"][0] if isinstance(v["patch_size"], list) else v["patch_size"]
    vision = dict(architectures=["InternVisionModel"], attention_dropout=0.0, drop_path_rate=0.0, dropout=0.0,
                  hidden_act=v["hidden_act"], hidden_size=v["hidden_size"], image_size=image,
                  initializer_factor=1.0, initializer_range=0.02, intermediate_size=v["intermediate_size"],
                  layer_norm_eps=v["layer_norm_eps"], model_type="intern_vit_6b", norm_type=v["norm_type"],
                  num_attention_heads=v["num_attention_heads"], num_channels=3,
                  num_hidden_layers=v["num_hidden_layers"], patch_size=patch, qk_normalization=v["use_qk_norm"],
                  qkv_bias=v["attention_bias"], torch_dtype="float32", use_flash_attn=False)
    return {
        "_commit_hash": None, "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": hf_cfg["downsample_ratio"], "dynamic_image_size": True, "force_image_size": image,
        "llm_config": llm, "max_dynamic_patch": 12, "min_dynamic_patch": 1, "model_type": "internvl_chat",
        "ps_version": "v2", "select_layer": hf_cfg["vision_feature_layer"], "template": template,
        "torch_dtype": "float32", "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
        "vision_config": vision,
    }


TEMPLATES = {"internlm2": "internlm2-chat", "llama": "Hermes-2", "qwen2": "Hermes-2", "qwen3": "internvl2_5",
             "phi3": "phi3-chat"}


def write_original(hf_dir: Path, out: Path, flavour: str, shards: int = 1) -> Path:
    """Write the original-format twin of an -hf dir: config.json, weights, tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    sd = hf_state_to_original(to_module_layout(read_safetensors_dir(hf_dir)), hf_cfg, flavour)
    (out / "config.json").write_text(json.dumps(original_config(hf_cfg, flavour, TEMPLATES[flavour]), indent=2))
    write_weights(sd, out, shards)
    _copy_tokenizer(hf_dir, out)
    return out


def write_weights(sd: dict, out: Path, shards: int = 1):
    """model.safetensors, or `shards` files plus model.safetensors.index.json (keys split in order)."""
    sd = {k: x.contiguous() for k, x in sd.items()}
    if shards == 1:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(x.numel() * x.element_size() for x in sd.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


_LAYOUT_RENAMES = [  # transformers 4.5x on-disk names (what save_pretrained writes) <-> in-memory 5.x names
    ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")]


def to_module_layout(sd: dict) -> dict:
    """-hf keys as the transformers 5 module names them (model.vision_tower..., lm_head...)."""
    out = {}
    for k, x in sd.items():
        for a, b in _LAYOUT_RENAMES:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        out[k] = x
    return out


def write_hf_module_layout(hf_dir: Path, out: Path) -> Path:
    """The same -hf checkpoint with the in-memory transformers 5 key names
    (save_pretrained itself writes the 4.5x names: vision_tower., language_model.model., ...)."""
    out.mkdir(parents=True, exist_ok=True)
    write_weights(to_module_layout(read_safetensors_dir(hf_dir)), out)
    shutil.copy(hf_dir / "config.json", out / "config.json")
    _copy_tokenizer(hf_dir, out)
    return out
