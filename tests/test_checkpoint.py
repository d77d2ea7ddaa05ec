"""compile/checkpoint.py and compile/registry.py against tiny checkpoints in every format."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from internvl_aot.compile.checkpoint import (
    CheckpointError, canonical_shapes, checkpoint_fingerprint, load_checkpoint, load_config,
    num_parameters, pack_wqkv, random_weights, unpack_wqkv)
from internvl_aot.compile.registry import (
    UnsupportedModelError, is_registry_name, list_models, registry_config, registry_entry)
from tiny_checkpoints import SPECS, VARIANTS, read_safetensors_dir


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    """Canonical (cfg, state) of every checkpoint dir, loaded once."""
    out = {}
    for name, ck in tiny_checkpoints.items():
        out[(name, "hf")] = load_checkpoint(ck.hf_dir)
        for flavour, d in ck.original_dirs.items():
            out[(name, flavour)] = load_checkpoint(d)
    return out


def _copy(src, tmp_path, name="ckpt"):
    return shutil.copytree(src, tmp_path / name)


def _rewrite_weights(d, fn):
    sd = fn(read_safetensors_dir(d))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))


def _edit_config(d, fn):
    c = json.loads((d / "config.json").read_text())
    fn(c)
    (d / "config.json").write_text(json.dumps(c))


# ---------------------------------------------------------------- same weights from every format

@pytest.mark.parametrize("name,variant", VARIANTS)
def test_every_format_gives_the_same_canonical_state(loaded, name, variant):
    cfg_h, sd_h = loaded[(name, "hf")]
    cfg_o, sd_o = loaded[(name, variant)]
    assert list(sd_o) == list(sd_h) == list(canonical_shapes(cfg_o))
    for k in sd_h:
        assert sd_o[k].dtype == sd_h[k].dtype == torch.float32, k
        assert torch.equal(sd_o[k], sd_h[k]), k


@pytest.mark.parametrize("name", list(SPECS))
def test_canonical_state_matches_transformers_modules(loaded, tiny_hf_model, name):
    cfg, sd = loaded[(name, "hf")]
    m = tiny_hf_model(name)
    vt, lm = m.model.vision_tower, m.model.language_model
    for k, shape in canonical_shapes(cfg).items():
        assert tuple(sd[k].shape) == shape, k
    for i, layer in enumerate(vt.encoder.layer):
        p = f"vision_model.encoder.layers.{i}."
        a = layer.attention
        assert torch.equal(sd[p + "attn.qkv.weight"], torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        assert torch.equal(sd[p + "attn.proj.weight"], a.projection_layer.weight)
        assert torch.equal(sd[p + "ls1"], layer.lambda_1) and torch.equal(sd[p + "ls2"], layer.lambda_2)
        assert torch.equal(sd[p + "norm1.weight"], layer.layernorm_before.weight)
        if cfg.vision.qk_normalization:
            assert torch.equal(sd[p + "attn.q_norm.weight"], a.q_norm.weight)
        if cfg.vision.qkv_bias:
            assert torch.equal(sd[p + "attn.qkv.bias"], torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
    assert torch.equal(sd["vision_model.embeddings.class_embedding"], vt.embeddings.cls_token)
    assert torch.equal(sd["vision_model.embeddings.position_embedding"], vt.embeddings.position_embeddings)
    assert torch.equal(sd["mlp1.0.weight"], m.model.multi_modal_projector.layer_norm.weight)
    assert torch.equal(sd["mlp1.3.weight"], m.model.multi_modal_projector.linear_2.weight)
    assert torch.equal(sd["language_model.layers.1.self_attn.k_proj.weight"], lm.layers[1].self_attn.k_proj.weight)
    assert torch.equal(sd["language_model.lm_head.weight"], m.lm_head.weight)
    assert not torch.equal(sd["language_model.lm_head.weight"], sd["language_model.embed_tokens.weight"])
    # every tensor is non-trivial: no ones/zeros left by transformers' init
    for k, t in sd.items():
        assert t.std() > 0 and not torch.all(t == 1), k


# ---------------------------------------------------------------- InternLM2 wqkv

def test_unpack_wqkv_small_by_hand():
    # 4 query heads, 2 KV heads, head_dim 1, hidden 1: rows q0 q1 k0 v0 q2 q3 k1 v1
    w = torch.tensor([[0.], [1.], [10.], [20.], [2.], [3.], [11.], [21.]])
    q, k, v = unpack_wqkv(w, num_heads=4, num_kv_heads=2, head_dim=1)
    assert q.flatten().tolist() == [0, 1, 2, 3]
    assert k.flatten().tolist() == [10, 11] and v.flatten().tolist() == [20, 21]
    assert torch.equal(pack_wqkv(q, k, v, 4, 2, 1), w)


def test_wqkv_unpacking_against_hand_computation(tiny_checkpoints, loaded):
    ck = tiny_checkpoints["llama_vit6b"]
    cfg, sd = loaded[("llama_vit6b", "internlm2")]
    raw = read_safetensors_dir(ck.original_dirs["internlm2"])
    hf = read_safetensors_dir(ck.hf_dir)
    nh, kv, hd = cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.head_dim
    g = nh // kv
    for i in range(cfg.llm.num_layers):
        wqkv = raw[f"language_model.model.layers.{i}.attention.wqkv.weight"]
        assert wqkv.shape == ((nh + 2 * kv) * hd, cfg.llm.hidden_size)
        q_rows, k_rows, v_rows = [], [], []
        for j in range(kv):                       # one block of g + 2 heads per KV head
            block = wqkv[j * (g + 2) * hd:(j + 1) * (g + 2) * hd]
            q_rows += [block[h * hd:(h + 1) * hd] for h in range(g)]
            k_rows.append(block[g * hd:(g + 1) * hd])
            v_rows.append(block[(g + 1) * hd:(g + 2) * hd])
        p = f"language_model.layers.{i}.self_attn."
        for name, rows in (("q", q_rows), ("k", k_rows), ("v", v_rows)):
            assert torch.equal(sd[p + f"{name}_proj.weight"], torch.cat(rows)), (i, name)
            assert torch.equal(sd[p + f"{name}_proj.weight"],
                               hf[f"language_model.model.layers.{i}.self_attn.{name}_proj.weight"]), (i, name)


# ---------------------------------------------------------------- layouts, shards, dtype

def test_both_hf_key_layouts(tiny_checkpoints):
    ck = tiny_checkpoints["llama_vit6b"]
    disk = set(read_safetensors_dir(ck.hf_dir))
    module = set(read_safetensors_dir(ck.original_dirs["hf-module-layout"]))
    assert "language_model.lm_head.weight" in disk and "vision_tower.embeddings.cls_token" in disk
    assert "lm_head.weight" in module and "model.vision_tower.embeddings.cls_token" in module
    _, a = load_checkpoint(ck.hf_dir)
    _, b = load_checkpoint(ck.original_dirs["hf-module-layout"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint(tiny_checkpoints, loaded):
    d = tiny_checkpoints["llama_vit300m"].original_dirs["internlm2-sharded"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and not (d / "model.safetensors").exists()
    _, sd = loaded[("llama_vit300m", "internlm2-sharded")]
    _, ref = loaded[("llama_vit300m", "internlm2")]
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_dtype_cast(tiny_checkpoints, loaded):
    _, ref = loaded[("qwen2_vit300m", "qwen2")]
    _, sd = load_checkpoint(tiny_checkpoints["qwen2_vit300m"].original_dirs["qwen2"], dtype=torch.bfloat16)
    for k in ref:
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], ref[k].to(torch.bfloat16)), k


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("name,variant", VARIANTS)
def test_config_fields_agree_across_formats(loaded, tiny_checkpoints, name, variant):
    spec, ck = SPECS[name], tiny_checkpoints[name]
    h, o = loaded[(name, "hf")][0], loaded[(name, variant)][0]
    assert o.vision == h.vision
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
              "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "qkv_bias",
              "tie_word_embeddings"):
        assert getattr(o.llm, f) == getattr(h.llm, f), f
    for c in (h, o):
        assert c.select_layer == spec.select_layer and c.ps_version == "v2" and c.downsample_ratio == 0.5
        assert c.image_context_token_id == ck.image_token_id
        assert c.llm.head_dim == 16 and c.llm.num_kv_heads == 2 and c.llm.rope_theta == 1e6
        assert c.num_image_token == 256 and c.projector_in == 256
        assert (c.vision.norm_type, c.vision.qkv_bias, c.vision.qk_normalization) == (
            ("rms_norm", False, True) if spec.vit == "6b" else ("layer_norm", True, False))
    assert h.llm.rope_scaling == ({"type": "dynamic", "factor": 2.0} if spec.text == "llama" else None)
    assert o.llm.arch == {"internlm2": "internlm2", "internlm2-sharded": "internlm2", "llama": "llama",
                          "qwen2": "qwen2", "hf-module-layout": "llama"}[variant]
    assert o.template == {"internlm2": "internlm2-chat", "internlm2-sharded": "internlm2-chat",
                          "llama": "Hermes-2", "qwen2": "Hermes-2", "hf-module-layout": "internvl2_5"}[variant]
    assert h.llm.qkv_bias == (spec.text == "qwen2")


def test_original_config_defaults(tiny_checkpoints, tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    c = json.loads((tiny_checkpoints["llama_vit6b"].original_dirs["llama"] / "config.json").read_text())
    for k in ("ps_version", "dynamic_image_size", "use_thumbnail", "max_dynamic_patch", "select_layer"):
        c.pop(k)
    (d / "config.json").write_text(json.dumps(c))  # like InternVL-Chat-V1-2's: InternVLChatConfig defaults
    cfg = load_config(d)
    assert (cfg.ps_version, cfg.dynamic_image_size, cfg.use_thumbnail, cfg.max_dynamic_patch, cfg.select_layer) \
        == ("v1", False, False, 6, -1)
    assert cfg.image_context_token_id == -1  # no tokenizer files here


def test_image_context_token_sources(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["llama_vit300m"].original_dirs["internlm2"]
    want = tiny_checkpoints["llama_vit300m"].image_token_id
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    shutil.copy(src / "added_tokens.json", d / "added_tokens.json")
    assert load_config(d).image_context_token_id == want
    (d / "added_tokens.json").unlink()
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 7, "content": "<IMG_CONTEXT>"}]}))
    assert load_config(d).image_context_token_id == 7
    shutil.copy(src / "tokenizer_config.json", d / "tokenizer_config.json")  # added_tokens_decoder wins
    assert load_config(d).image_context_token_id == want


def test_hf_image_token_id_must_match_tokenizer(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2_vit6b"].hf_dir, tmp_path)
    _edit_config(d, lambda c: c.update(image_token_id=3))
    with pytest.raises(CheckpointError, match="image_token_id"):
        load_config(d)


# ---------------------------------------------------------------- errors

def test_missing_key(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama_vit300m"].original_dirs["internlm2"], tmp_path)
    _rewrite_weights(d, lambda sd: {k: v for k, v in sd.items() if "layers.1.feed_forward.w3" not in k})
    with pytest.raises(CheckpointError, match=r"missing keys.*language_model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(d)


def test_missing_hf_vision_projection(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2_vit300m"].hf_dir, tmp_path)
    _rewrite_weights(d, lambda sd: {k: v for k, v in sd.items() if "layer.0.attention.k_proj.weight" not in k})
    with pytest.raises(CheckpointError, match=r"missing keys.*layers\.0\.attention\.k_proj\.weight"):
        load_checkpoint(d)


def test_unexpected_key(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2_vit300m"].original_dirs["qwen2"], tmp_path)
    _rewrite_weights(d, lambda sd: {**sd, "language_model.model.layers.0.self_attn.o_proj.bias": torch.ones(64)})
    with pytest.raises(CheckpointError, match=r"unexpected keys.*self_attn\.o_proj\.bias"):
        load_checkpoint(d)


def test_shape_mismatch(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama_vit6b"].original_dirs["internlm2"], tmp_path)
    _rewrite_weights(d, lambda sd: {**sd, "mlp1.1.weight": torch.zeros(64, 255)})
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'mlp1\.1\.weight'.*\[64, 256\]"):
        load_checkpoint(d)
    d2 = _copy(tiny_checkpoints["llama_vit6b"].original_dirs["internlm2"], tmp_path, "vocab")
    _edit_config(d2, lambda c: c["llm_config"].update(vocab_size=400))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'language_model\.model\.tok_embeddings"):
        load_checkpoint(d2)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "MixtralForCausalLM"])
def test_unsupported_architecture(tiny_checkpoints, tmp_path, arch):
    d = _copy(tiny_checkpoints["llama_vit300m"].original_dirs["llama"], tmp_path)
    _edit_config(d, lambda c: c["llm_config"].update(architectures=[arch]))
    with pytest.raises(CheckpointError, match=arch):
        load_checkpoint(d)


def test_unsupported_hf_text_model(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2_vit300m"].hf_dir, tmp_path)
    _edit_config(d, lambda c: c["text_config"].update(model_type="mistral"))
    with pytest.raises(CheckpointError, match="mistral"):
        load_checkpoint(d)


def test_bin_only_checkpoint_is_refused(tiny_checkpoints, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_checkpoints["llama_vit300m"].original_dirs["internlm2"] / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not a pickle; must never be unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        load_checkpoint(d)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_lm_head_absent(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2_vit6b"].hf_dir, tmp_path)
    _rewrite_weights(d, lambda sd: {k: v for k, v in sd.items() if "lm_head" not in k})
    with pytest.raises(CheckpointError, match=r"missing keys.*lm_head"):
        load_checkpoint(d)
    _edit_config(d, lambda c: c.update(tie_word_embeddings=True))  # tied: copy embed_tokens
    cfg, sd = load_checkpoint(d)
    assert cfg.llm.tie_word_embeddings
    assert torch.equal(sd["language_model.lm_head.weight"], sd["language_model.embed_tokens.weight"])


# ---------------------------------------------------------------- fingerprint

def test_checkpoint_fingerprint(tiny_checkpoints, tmp_path):
    a = tiny_checkpoints["llama_vit300m"].original_dirs["internlm2"]
    fa = checkpoint_fingerprint(a)
    assert fa == checkpoint_fingerprint(a) and len(fa) == 64
    assert fa != checkpoint_fingerprint(tiny_checkpoints["llama_vit6b"].original_dirs["internlm2"])
    d = _copy(a, tmp_path)
    assert checkpoint_fingerprint(d) == fa
    _edit_config(d, lambda c: c.update(template="Hermes-2"))
    assert checkpoint_fingerprint(d) != fa


# ---------------------------------------------------------------- registry

def test_every_registry_entry_builds():
    for name in list_models():
        entry = registry_entry(name)
        if entry.unsupported:
            with pytest.raises(UnsupportedModelError, match="mixture-of-experts language model is not supported yet"):
                registry_config(name)
            cfg = registry_config(name, allow_unsupported=True)
        else:
            cfg = registry_config(name)
        assert cfg.name == name and cfg.num_image_token == 256
        assert cfg.llm.num_heads % cfg.llm.num_kv_heads == 0
        # Qwen3 (InternVL3.5) and InternLM3 keep head_dim 128 whatever the width
        assert cfg.llm.head_dim * cfg.llm.num_heads == cfg.llm.hidden_size or cfg.llm.arch in ("qwen3", "internlm3")
        assert cfg.vision.image_size == 448 and cfg.vision.patch_size == 14
        assert len(canonical_shapes(cfg)) > 0
    assert set(list_models()) - set(list_models(include_unsupported=False)) == {
        "internvl3.5-30b-a3b", "internvl3.5-241b-a28b", "internvl3.5-gpt-oss-20b-a4b"}
    assert registry_entry("OpenGVLab/InternVL2-Llama3-76B").name == "internvl2-76b"
    assert is_registry_name("InternVL2-2B") and not is_registry_name("no-such-model")
    with pytest.raises(KeyError):
        registry_config("no-such-model")


def test_registry_architectures():
    c = registry_config("internvl-chat-v1-2")
    assert (c.ps_version, c.dynamic_image_size, c.template, c.vision.num_layers) == ("v1", False, "Hermes-2", 45)
    c = registry_config("internvl2-2b")
    assert (c.llm.arch, c.vision.norm_type, c.image_context_token_id, c.template) == \
        ("internlm2", "layer_norm", 92546, "internlm2-chat")
    c = registry_config("internvl2-26b")
    assert (c.vision.hidden_size, c.vision.qk_normalization, c.llm.rope_scaling["factor"]) == (3200, True, 3.0)
    assert registry_config("internvl2-1b").llm.qkv_bias
    c = registry_config("internvl2-4b")
    assert (c.llm.arch, c.template, c.llm.rope_scaling["type"], len(c.llm.rope_scaling["long_factor"])) == \
        ("phi3", "phi3-chat", "longrope", c.llm.head_dim // 2)
    for name, arch in (("internvl2.5-1b", "qwen2"), ("internvl2.5-8b", "internlm2"), ("internvl3-9b", "internlm3"),
                       ("internvl3-78b", "qwen2"), ("internvl3.5-8b", "qwen3")):
        c = registry_config(name)
        assert (c.llm.arch, c.template, c.ps_version, c.select_layer) == (arch, "internvl2_5", "v2", -1), name
    c = registry_config("internvl3.5-8b")
    assert (c.llm.head_dim, c.llm.qk_norm, c.llm.qkv_bias, c.llm.vocab_size) == (128, True, False, 151936)
    assert registry_config("internvl3.5-38b").vision.qk_normalization and registry_config("InternVL3-1B").llm.qkv_bias
    assert registry_entry("OpenGVLab/InternVL2_5-78B").name == "internvl2.5-78b"
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        registry_config("OpenGVLab/InternVL3_5-30B-A3B")


@pytest.mark.parametrize("name,lo,hi", [("internvl2-1b", 0.85e9, 1.0e9), ("internvl2-2b", 2.1e9, 2.3e9),
                                        ("internvl2-8b", 8.0e9, 8.2e9), ("internvl2-26b", 25.0e9, 26.0e9),
                                        ("internvl2-76b", 75.5e9, 77e9),
                                        # the model cards' sizes (B): InternVL2-4B 4.2, 2.5-4B 3.7, 3-2B 2.1,
                                        # 3-9B 9.1, 3-14B 15.1, 3.5-1B 1.1, 3.5-4B 4.7, 3.5-8B 8.5, 3.5-38B 38.4
                                        ("internvl2-4b", 4.1e9, 4.25e9), ("internvl2.5-4b", 3.65e9, 3.75e9),
                                        ("internvl3-2b", 2.05e9, 2.15e9), ("internvl3-9b", 9.05e9, 9.2e9),
                                        ("internvl3-14b", 15.0e9, 15.2e9), ("internvl3.5-1b", 1.0e9, 1.1e9),
                                        ("internvl3.5-4b", 4.65e9, 4.8e9), ("internvl3.5-8b", 8.45e9, 8.6e9),
                                        ("internvl3.5-38b", 38.3e9, 38.5e9)])
def test_registry_parameter_counts(name, lo, hi):
    assert lo <= num_parameters(registry_config(name)) <= hi


def test_random_weights_tiny(loaded):
    cfg = loaded[("llama_vit6b", "internlm2")][0]
    w = random_weights(cfg, torch.bfloat16, seed=1)
    shapes = canonical_shapes(cfg)
    assert list(w) == list(shapes)
    for k, t in w.items():
        assert tuple(t.shape) == shapes[k] and t.dtype == torch.bfloat16 and torch.isfinite(t).all(), k
    assert 0.1 <= w["vision_model.encoder.layers.0.ls1"].min() and w["vision_model.encoder.layers.0.ls1"].max() <= 1
    assert abs(w["language_model.norm.weight"].float().mean() - 1) < 0.1
    assert w["language_model.layers.0.self_attn.q_proj.weight"].float().std() < 0.3
    w2 = random_weights(cfg, torch.bfloat16, seed=1)
    assert all(torch.equal(w[k], w2[k]) for k in w)
    w3 = random_weights(cfg, torch.float32, seed=2)
    assert not torch.equal(w3["mlp1.1.weight"], w["mlp1.1.weight"].float())
