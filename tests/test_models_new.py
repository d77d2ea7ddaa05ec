"""The backbones of InternVL2-4B (Phi-3), InternVL3.5 (Qwen3) against transformers, in both
checkpoint formats; InternVL2.5/3 (Qwen2.5 = Qwen2's architecture, InternLM2.5) run through the
existing specs (test_graphs_vs_transformers.py).

Tiny random checkpoints (tests/tiny_checkpoints.py NEW_SPECS): a Qwen3 one (per-head q/k RMSNorm,
head_dim 32 != hidden/heads 16, no bias; InternViT-300M kind) and a Phi-3 one (fused qkv_proj /
gate_up_proj, LongRoPE with short and long factors and original_max_position_embeddings 64, so a
short prompt crosses it while decoding; InternViT-6B kind), each as -hf and in the original
OpenGVLab format. Vision embeddings and logits within 1e-4 (fp32), 32 greedy tokens equal to
transformers for a single image, two images and a text prompt, eagerly and through a compiled
fp32 artifact (one format per backbone) and with TP=2 (eager graphs in real rank processes, as
tests/test_tp.py does; the other format). Both formats give bit-identical canonical weights and configs.
"""
from pathlib import Path

import pytest
import torch

from internvl_aot.compile.buckets import Buckets
from internvl_aot.compile.checkpoint import CheckpointError, canonical_shapes, load_checkpoint
from internvl_aot.graphs.model import PrefillStage, build_model
from internvl_aot.runtime.engine import Engine, Request
from internvl_aot.runtime.sampler import SamplingParams
from internvl_aot.runtime.tokenizer import Tokenizer
from test_graphs_vs_transformers import _image, _rel, check_vision_and_prefill, hf_greedy
from tiny_checkpoints import PHI3_ORIGINAL_MAX, load_hf_model

CASES = [("qwen3_vit300m", "hf"), ("qwen3_vit300m", "qwen3"), ("phi3_vit6b", "hf"), ("phi3_vit6b", "phi3")]
# One prefill chunk holds every test prompt: transformers picks Phi-3's short or long RoPE factors
# once per forward call (graphs/rotary.py), so a prompt is compared prefilled in one piece.
BUCKETS = "vision=2;prefill=1024;batch=4;context=1024;block_size=64"   # 3 graphs per artifact


def _dir(ck, fmt):
    return ck.hf_dir if fmt == "hf" else ck.original_dirs[fmt]


_HF = {}


def _hf(ck):
    if ck.name not in _HF:
        _HF[ck.name] = load_hf_model(ck.hf_dir)
    return _HF[ck.name]


# ================================================================ weights and config

@pytest.mark.parametrize("name,fmt", [("qwen3_vit300m", "qwen3"), ("qwen3_vit300m", "qwen3-vocab"),
                                      ("phi3_vit6b", "phi3")])
def test_both_formats_give_the_same_canonical_state(name, fmt, new_checkpoints):
    ck = new_checkpoints[name]
    cfg_h, sd_h = load_checkpoint(ck.hf_dir)
    cfg_o, sd_o = load_checkpoint(_dir(ck, fmt))
    assert list(sd_o) == list(sd_h) == list(canonical_shapes(cfg_h))
    assert all(torch.equal(sd_o[k], sd_h[k]) for k in sd_h)
    assert cfg_o.llm == cfg_h.llm and cfg_o.vision == cfg_h.vision
    assert cfg_o.image_context_token_id == cfg_h.image_context_token_id == ck.image_token_id


def test_qwen3_config_and_weights(new_checkpoints):
    ck = new_checkpoints["qwen3_vit300m"]
    cfg, sd = load_checkpoint(ck.hf_dir)
    l = cfg.llm
    assert (l.arch, l.head_dim, l.qk_norm, l.qkv_bias) == ("qwen3", 32, True, False)
    assert l.head_dim * l.num_heads != l.hidden_size
    lm = _hf(ck).model.language_model
    a = lm.layers[1].self_attn
    assert torch.equal(sd["language_model.layers.1.self_attn.q_norm.weight"], a.q_norm.weight)
    assert torch.equal(sd["language_model.layers.1.self_attn.k_norm.weight"], a.k_norm.weight)
    assert sd["language_model.layers.1.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert "language_model.layers.1.self_attn.q_proj.bias" not in sd
    assert load_checkpoint(ck.original_dirs["qwen3"])[0].template == "internvl2_5"


def test_phi3_fused_weights_are_split_by_rows(new_checkpoints):
    ck = new_checkpoints["phi3_vit6b"]
    cfg, sd = load_checkpoint(ck.original_dirs["phi3"])
    l = cfg.llm
    assert l.arch == "phi3" and cfg.template == "phi3-chat"
    assert l.rope_scaling["type"] == "longrope" and l.rope_scaling["original_max_position_embeddings"] == PHI3_ORIGINAL_MAX
    assert len(l.rope_scaling["short_factor"]) == len(l.rope_scaling["long_factor"]) == l.head_dim // 2
    layer = _hf(ck).model.language_model.layers[0]
    qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    q, kv = l.num_heads * l.head_dim, l.num_kv_heads * l.head_dim
    p = "language_model.layers.0."
    assert torch.equal(sd[p + "self_attn.q_proj.weight"], qkv[:q])
    assert torch.equal(sd[p + "self_attn.k_proj.weight"], qkv[q:q + kv])
    assert torch.equal(sd[p + "self_attn.v_proj.weight"], qkv[q + kv:])
    assert torch.equal(sd[p + "mlp.gate_proj.weight"], gate_up[:l.intermediate_size])
    assert torch.equal(sd[p + "mlp.up_proj.weight"], gate_up[l.intermediate_size:])


def test_moe_backbones_are_refused_with_the_readme_message(new_checkpoints, tmp_path):
    import json
    import shutil
    for fmt, arch_edit in (("qwen3", lambda c: c["llm_config"].update(architectures=["Qwen3MoeForCausalLM"])),
                           ("hf", lambda c: c["text_config"].update(model_type="qwen3_moe")),
                           ("qwen3", lambda c: c["llm_config"].update(architectures=["GptOssForCausalLM"]))):
        d = shutil.copytree(_dir(new_checkpoints["qwen3_vit300m"], fmt), tmp_path / f"moe-{fmt}-{id(arch_edit)}")
        c = json.loads((d / "config.json").read_text())
        arch_edit(c)
        (d / "config.json").write_text(json.dumps(c))
        with pytest.raises(CheckpointError, match="mixture-of-experts .* not supported yet"):
            load_checkpoint(d)


# ================================================================ numerics against transformers

@pytest.mark.parametrize("name,fmt", CASES)
def test_vision_embeddings_and_logits(name, fmt, new_checkpoints):
    ck = new_checkpoints[name]
    cfg, weights = load_checkpoint(_dir(ck, fmt))
    model = build_model(cfg, weights, max_seq_len=2048)
    hf = _hf(ck)
    torch.manual_seed(0)
    # One prefill of 263 tokens (Phi-3: past original_max_position_embeddings, so the long factors)
    check_vision_and_prefill(model, hf, cfg, torch.randn(2, 3, 448, 448))
    bs, nblocks = 16, 64
    attn = model.language_model.layers[0].self_attn
    k = torch.zeros(cfg.llm.num_layers, nblocks, bs, attn.kv_heads, attn.head_dim)
    v = torch.zeros_like(k)
    with torch.no_grad():
        # and a short one (Phi-3: below the threshold, the short factors)
        short = [1, 5, 9, 7, 11, 13, 17, 19]
        ref_short = hf(input_ids=torch.tensor([short])).logits[0, -1]
        n = len(short)
        logits = PrefillStage(model)(torch.tensor(short), torch.arange(n), torch.zeros(n, cfg.llm.hidden_size),
                                     torch.zeros(n, dtype=torch.bool), torch.arange(n) + bs,
                                     torch.arange(1, nblocks)[None], torch.tensor([n - 1]), k, v)
        assert _rel(logits[0, :ref_short.shape[0]], ref_short) < 1e-4


def _requests(max_new=32):
    p = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    return [
        Request(prompt="What is shown in this picture?", images=[_image(1, 700, 400)], max_tiles=2, params=p),
        Request(prompt="Image-1: <image>\nImage-2: <image>\nDescribe the two images.",
                images=[_image(2, 300, 300), _image(3, 200, 900)], max_tiles=1, params=p),
        # A short system message keeps this prompt below Phi-3's threshold (64): decoding crosses it.
        Request(prompt="Hello, world! Please answer the question briefly.", system="Be brief.", params=p),
    ]


_GREEDY = {}


def _hf_greedy(ck, prompt_ids, tiles):
    """transformers' 32 greedy tokens, once per spec and prompt (both formats hold the same weights)."""
    key = (ck.name, tuple(prompt_ids))
    if key not in _GREEDY:
        _GREEDY[key] = hf_greedy(_hf(ck), prompt_ids, tiles, 32)
    return _GREEDY[key]


def _check_against_transformers(results, reqs, engine, ck, phi3: bool):
    for req, res in zip(reqs, results):
        assert len(res.output_token_ids) == 32
        tiles = engine.make_sequence(req).pixel_values
        assert res.output_token_ids == _hf_greedy(ck, res.prompt_token_ids, tiles), req.prompt
    assert [r.num_tiles for r in results] == [[3], [1, 1], []]
    assert max(len(set(r.output_token_ids)) for r in results) > 3
    if phi3:
        n = len(results[2].prompt_token_ids)
        assert n < PHI3_ORIGINAL_MAX < n + 32, n        # short factors at first, long ones later


@pytest.fixture(scope="module")
def new_artifact(new_checkpoints, tmp_path_factory):
    from internvl_aot.compile.pipeline import compile_model
    root = tmp_path_factory.mktemp("new_artifacts")
    cache = {}

    def get(name, fmt):
        if (name, fmt) not in cache:
            src = _dir(new_checkpoints[name], fmt)
            cfg, weights = load_checkpoint(src)
            out = root / f"{name}-{fmt}"
            compile_model(cfg, weights, src, out, Buckets.parse(BUCKETS), dtype="fp32", source={"path": str(src)},
                          log=lambda m: None)
            cache[(name, fmt)] = out
        return cache[(name, fmt)]

    return get


@pytest.mark.parametrize("name,fmt", [("qwen3_vit300m", "hf"), ("phi3_vit6b", "phi3")])
def test_compiled_artifact_greedy_matches_transformers(name, fmt, new_checkpoints, new_artifact):
    ck = new_checkpoints[name]
    art = new_artifact(name, fmt)
    engine = Engine.from_artifact(art)
    reqs = _requests()
    _check_against_transformers(engine.generate(reqs), reqs, engine, ck, name.startswith("phi3"))
    import json
    m = json.loads((Path(art) / "manifest.json").read_text())
    tok = Tokenizer.from_dir(art / "tokenizer") if (art / "tokenizer").is_dir() else Tokenizer.from_dir(
        _dir(ck, fmt))
    sep = {"qwen3_vit300m": "<|im_end|>", "phi3_vit6b": "<|end|>"}[name]
    assert m["generation"]["stop_token_ids"] == [tok.token_to_id(sep)]
    assert m["generation"]["eos_token_ids"] == [tok.eos_id]
    # the rope_table pass folded the trigonometry into tables: Phi-3's context bucket (1024) is past its
    # original_max_position_embeddings (64), so the long-factor tables are there as well
    tables = {k.split(".")[3] for k in json.dumps(m).replace('"', " ").split() if k.startswith("_aoti.language_model.rotary.")}
    assert {"cos_table", "sin_table"} <= tables
    assert ({"long_cos_table", "long_sin_table"} <= tables) == name.startswith("phi3"), tables


# ================================================================ tensor parallelism (eager, real ranks)

# The other format of each backbone (qwen3 original, phi3 -hf) at TP=2: together with the compiled TP=1
# test above, both formats of both backbones meet transformers' tokens.
@pytest.mark.parametrize("name,fmt", [("qwen3_vit300m", "qwen3"), ("phi3_vit6b", "hf")])
def test_tp2_greedy_matches_transformers(name, fmt, new_checkpoints):
    from test_tp import _children, eager_tp_group
    ck = new_checkpoints[name]
    src = Path(_dir(ck, fmt))
    reqs = _requests()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, weights, tok, spec, graphs, group = eager_tp_group(src, 2, BUCKETS)
        assert spec["tp"] == 2 and spec["rank"]["kv_heads"] == 1
        with Engine(spec, graphs, tok, "cpu", tp_group=group) as engine:
            _check_against_transformers(engine.generate(reqs), reqs, engine, ck, name.startswith("phi3"))
    finally:
        torch.set_num_threads(threads)
    assert _children() == []


# ================================================================ templates, as conversation.py writes them

# The fields of OpenGVLab/InternVL internvl_chat/internvl/conversation.py, copied character for character
# (all MPT separator style): name -> (system_template, system_message, roles, sep).
_SYS2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
CONVERSATION_PY = {
    "Hermes-2": ("<|im_start|>system\n{system_message}", _SYS2,
                 ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "internlm2-chat": ("<|im_start|>system\n{system_message}", _SYS2,
                       ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "phi3-chat": ("<|system|>\n{system_message}", _SYS2, ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
    "internvl2_5": ("<|im_start|>system\n{system_message}",
                    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
                    ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>\n"),
}


def _mpt_prompt(name, messages, system=None):
    """Conversation.get_prompt() for SeparatorStyle.MPT, written from conversation.py's text."""
    system_template, system_message, _, sep = CONVERSATION_PY[name]
    ret = system_template.format(system_message=system_message if system is None else system) + sep
    for role, message in messages:
        ret += role + message + sep if message else role
    return ret


def test_templates_equal_conversation_py():
    from internvl_aot.runtime.templates import TEMPLATES
    for name, (system_template, system_message, roles, sep) in CONVERSATION_PY.items():
        t = TEMPLATES[name]
        assert (t.system_template, t.system_message, t.roles, t.sep) == (system_template, system_message, roles, sep)
        # chat()'s eos: tokenizer.convert_tokens_to_ids(template.sep.strip())
        assert t.stop_strings == [sep.strip()]


@pytest.mark.parametrize("model", ["internvl2-4b", "internvl2.5-8b", "internvl3-1b", "internvl3-9b",
                                   "internvl3.5-8b", "internvl3.5-38b"])
def test_prompts_equal_the_original_chat(model):
    """chat(): '<image>\\n' before a one-image question (after replacing nothing else), 'Image-i: <image>\\n' lines
    for several; each <image> -> <img> + <IMG_CONTEXT> x 256 x tiles + </img>; history as (user, assistant) turns."""
    from internvl_aot.compile.registry import registry_config
    from internvl_aot.runtime.templates import build_prompt
    cfg = registry_config(model)
    name, n = cfg.template, cfg.num_image_token
    user, bot = CONVERSATION_PY[name][2]

    def img(tiles):
        return "<img>" + "<IMG_CONTEXT>" * (n * tiles) + "</img>"

    q = "Describe the image."
    assert build_prompt(name, q, [5], n) == _mpt_prompt(name, [(user, img(5) + "\n" + q), (bot, None)])
    q2 = "What differs?"
    assert build_prompt(name, q2, [2, 3], n, system="S") == _mpt_prompt(
        name, [(user, f"Image-1: {img(2)}\nImage-2: {img(3)}\n" + q2), (bot, None)], system="S")
    hist = [("Hi", "Hello!")]
    assert build_prompt(name, "Tell me more.", history=hist) == _mpt_prompt(
        name, [(user, "Hi"), (bot, "Hello!"), (user, "Tell me more."), (bot, None)])


# ================================================================ tokenizers as the checkpoints ship them

def test_qwen3_tokenizer_forms_agree_and_match_transformers(new_checkpoints):
    from transformers import AutoTokenizer
    ck = new_checkpoints["qwen3_vit300m"]
    a = Tokenizer.from_dir(ck.original_dirs["qwen3"])          # tokenizer.json
    b = Tokenizer.from_dir(ck.original_dirs["qwen3-vocab"])    # vocab.json + merges.txt + added_tokens.json
    assert a.source.endswith("tokenizer.json") and b.source.endswith("vocab.json")
    ref = AutoTokenizer.from_pretrained(str(ck.original_dirs["qwen3-vocab"]))
    from internvl_aot.runtime.templates import build_prompt
    for text in [build_prompt("internvl2_5", "What is shown in this picture?", [1], 4),
                 "Hello, world!  123\n\nA cat sits on a red mat.<|im_end|>\n"]:
        assert a.encode(text) == b.encode(text) == ref(text)["input_ids"], text
    assert a.eos_id == b.eos_id == a.token_to_id("<|im_end|>")


def test_phi3_tokenizer_special_tokens(new_checkpoints):
    tok = Tokenizer.from_dir(new_checkpoints["phi3_vit6b"].original_dirs["phi3"])
    ids = tok.encode("<|user|>\nHi<|end|><|assistant|>\n", add_bos=False)
    assert ids[0] == tok.token_to_id("<|user|>") and tok.token_to_id("<|end|>") in ids
    assert tok.eos_id == tok.token_to_id("<|endoftext|>") != tok.token_to_id("<|end|>")


# ================================================================ the stop rule

def _engine_with_eos(ck, fmt, eos_token_ids=None, stop_token_ids=None):
    """An eager engine whose manifest says that `eos_token_ids` is the tokenizer's EOS."""
    from internvl_aot.compile.export import stage_module
    from internvl_aot.compile.spec import build_spec
    path = _dir(ck, fmt)
    cfg, weights = load_checkpoint(path)
    b = Buckets.parse("vision=1;prefill=128;batch=4;context=256;block_size=64")
    tok = Tokenizer.from_dir(path)
    spec = build_spec(cfg, b, "fp32", tok)
    if eos_token_ids is not None:
        spec["generation"]["eos_token_ids"] = eos_token_ids
    if stop_token_ids is not None:
        spec["generation"]["stop_token_ids"] = stop_token_ids
    if eos_token_ids is None and stop_token_ids is not None:
        spec["generation"].pop("eos_token_ids")                 # an artifact written before the split
    model = build_model(cfg, weights, max_seq_len=b.max_context)
    return Engine(spec, {n: stage_module(model, n) for n in b.graph_names()}, tok, "cpu"), tok


def test_manifest_records_template_stop_and_tokenizer_eos_apart(new_checkpoints):
    from internvl_aot.compile.spec import build_spec
    engine, tok = _engine_with_eos(new_checkpoints["phi3_vit6b"], "phi3")
    cfg, _ = load_checkpoint(new_checkpoints["phi3_vit6b"].original_dirs["phi3"])
    gen = build_spec(cfg, Buckets.parse("vision=1;prefill=128;batch=1;context=256"), "fp32", tok)["generation"]
    assert gen["stop_token_ids"] == [tok.token_to_id("<|end|>")]          # the template's sep only, as chat()
    assert gen["eos_token_ids"] == [tok.token_to_id("<|endoftext|>")]
    assert engine.stop_ids == {tok.token_to_id("<|end|>")}


def test_stop_at_eos_is_opt_in(new_checkpoints):
    """The model's 4th token plays the tokenizer's EOS: by default generation runs past it (the
    original chat() stops only at the template separator); with stop_at_eos it ends there. An artifact
    from before the split (EOS inside stop_token_ids, no eos_token_ids) keeps stopping at it."""
    ck = new_checkpoints["phi3_vit6b"]
    prompt = "Hello, world! Please answer the question briefly."
    engine, tok = _engine_with_eos(ck, "phi3")
    free = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=12, ignore_eos=True))])[0]
    out = free.output_token_ids
    sep = tok.token_to_id("<|end|>")
    assert sep not in out[:12]
    i = next(i for i in range(3, 12) if out[i] not in out[:i])
    eos = out[i]

    old, _ = _engine_with_eos(ck, "phi3", stop_token_ids=[sep, eos])
    r = old.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=12))])[0]
    assert r.output_token_ids == out[:i + 1] and r.finish_reason == "stop"

    engine, _ = _engine_with_eos(ck, "phi3", eos_token_ids=[eos])
    r = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=12))])[0]
    assert r.output_token_ids == out and r.finish_reason == "length"         # default: as the original
    r = engine.generate([Request(prompt=prompt, params=SamplingParams(max_new_tokens=12, stop_at_eos=True))])[0]
    assert r.output_token_ids == out[:i + 1] and r.finish_reason == "stop"


@pytest.mark.parametrize("model", ["internvl2-4b", "internvl2.5-1b", "internvl3-9b", "internvl3.5-1b"])
def test_random_weights_builds_have_a_spec(model, tmp_path):
    """WEIGHTS=random: the stand-in tokenizer has the template's stop token and <IMG_CONTEXT> at the
    registry's id, so the manifest can be written (one model per new backbone / family)."""
    from internvl_aot.compile.registry import registry_config
    from internvl_aot.compile.spec import build_spec
    from internvl_aot.compile.synthetic_tokenizer import write_synthetic_tokenizer
    from internvl_aot.runtime.templates import get_template
    cfg = registry_config(model)
    tok = Tokenizer.from_dir(write_synthetic_tokenizer(cfg, tmp_path))
    want_img = cfg.image_context_token_id
    spec = build_spec(cfg, Buckets.parse("vision=1;prefill=512;batch=1;context=1024;block_size=32"), "bf16", tok)
    sep = get_template(cfg.template).sep.strip()
    assert spec["generation"]["stop_token_ids"] == [tok.token_to_id(sep)]
    assert spec["generation"]["eos_token_ids"] == [tok.eos_id] and tok.eos_id not in spec["generation"]["stop_token_ids"]
    assert want_img in (-1, spec["model"]["config"]["image_context_token_id"])


def test_v2_5_vision_config_fields(new_checkpoints, tmp_path):
    """The fields InternViT-300M/6B-448px-V2_5 configs carry: drop_path_rate (training only) and InternVL3's
    MoE fields with use_moe false change nothing; use_moe true, or another select_layer, is read."""
    import json
    import shutil
    ck = new_checkpoints["phi3_vit6b"]
    src = ck.original_dirs["phi3"]
    cfg0, sd0 = load_checkpoint(src)
    assert (cfg0.vision.norm_type, cfg0.vision.qk_normalization, cfg0.vision.qkv_bias, cfg0.vision.layer_norm_eps) \
        == ("rms_norm", True, False, 1e-6)
    assert (cfg0.ps_version, cfg0.downsample_ratio, cfg0.select_layer) == ("v2", 0.5, -1)

    def edited(name, fn):
        d = shutil.copytree(src, tmp_path / name)
        c = json.loads((d / "config.json").read_text())
        fn(c)
        (d / "config.json").write_text(json.dumps(c))
        return d

    d = edited("v25", lambda c: c["vision_config"].update(
        drop_path_rate=0.4, use_moe=False, num_experts=8, num_routed_experts=4, moe_intermediate_size=768,
        use_flash_attn=True, _name_or_path="OpenGVLab/InternViT-6B-448px-V2_5"))
    cfg, sd = load_checkpoint(d)
    assert cfg.vision == cfg0.vision and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    with pytest.raises(CheckpointError, match="use_moe"):
        load_checkpoint(edited("moe", lambda c: c["vision_config"].update(use_moe=True)))
    cfg = load_checkpoint(edited("layer", lambda c: c.update(select_layer=-2, downsample_ratio=0.5)))[0]
    assert cfg.select_layer == -2


def test_internvl2_4b_longrope_matches_transformers_phi3_rotary():
    """The registry's InternVL2-4B rope (head_dim 96, 4096 -> 131072, its su factors) against
    transformers' Phi3RotaryEmbedding, for a decode step below and above the 4096 threshold and for a
    prefill chunk that reaches past it (long factors for the whole chunk, as one forward call there)."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    from internvl_aot.compile.registry import registry_config
    from internvl_aot.graphs.rotary import rotary_embedding
    l = registry_config("internvl2-4b").llm
    sc = l.rope_scaling
    hf_cfg = Phi3Config(hidden_size=l.hidden_size, num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
                        max_position_embeddings=l.max_position_embeddings,
                        original_max_position_embeddings=sc["original_max_position_embeddings"],
                        rope_parameters={"rope_type": "longrope", "rope_theta": l.rope_theta,
                                         "short_factor": sc["short_factor"], "long_factor": sc["long_factor"]})
    ref = Phi3RotaryEmbedding(hf_cfg)
    ours = rotary_embedding(l.head_dim, l.rope_theta, sc, l.max_position_embeddings, 8192)
    x = torch.zeros(1, 1, l.head_dim)
    for pos in ([[17]], [[4095]], [[4096]], [[8000]], [list(range(4000, 4100))], [list(range(0, 50))]):
        p = torch.tensor(pos)
        cos_r, sin_r = ref(x, p)
        cos, sin = ours(p, torch.float32)
        torch.testing.assert_close(cos, cos_r[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sin, sin_r[0], rtol=1e-5, atol=1e-5)
    assert abs(ours.attention_factor - 1.1902380714238083) < 1e-9       # sqrt(1 + ln 32 / ln 4096)
    assert rotary_embedding(l.head_dim, l.rope_theta, sc, l.max_position_embeddings, 4096).long_inv_freq is None


def test_internlm3_checkpoint_reads_as_llama(tiny_checkpoints, tmp_path):
    """InternVL3-9B's LLM is InternLM3ForCausalLM: Llama's module names and math (separate q/k/v, no bias,
    dynamic NTK RoPE, explicit head_dim). The Llama tiny checkpoint relabelled as InternLM3 (its
    llm_config fields: bias / qkv_bias false, head_dim) loads to the same canonical weights and config
    as the -hf Llama one, which the existing tests compare with transformers token for token."""
    import json
    import shutil
    ck = tiny_checkpoints["llama_vit300m"]
    d = shutil.copytree(ck.original_dirs["llama"], tmp_path / "internlm3")
    c = json.loads((d / "config.json").read_text())
    c["llm_config"].update(architectures=["InternLM3ForCausalLM"], model_type="internlm3", bias=False, qkv_bias=False,
                           head_dim=c["llm_config"]["hidden_size"] // c["llm_config"]["num_attention_heads"])
    c["llm_config"].pop("attention_bias", None)
    c.pop("template")
    (d / "config.json").write_text(json.dumps(c))
    cfg, sd = load_checkpoint(d)
    ref_cfg, ref = load_checkpoint(ck.hf_dir)
    assert cfg.llm.arch == "internlm3" and cfg.template == "internvl2_5"       # no template in config: InternVL3's
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "head_dim",
              "rms_norm_eps", "rope_theta", "rope_scaling", "qkv_bias", "qk_norm"):
        assert getattr(cfg.llm, f) == getattr(ref_cfg.llm, f), f
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    c["llm_config"]["qkv_bias"] = True
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="InternLM3 with bias"):
        load_checkpoint(d)
