"""Tiny random InternVL checkpoints in every format the compiler reads, for tests.

Each spec is first built as a transformers `InternVLForConditionalGeneration` (-hf format,
fp32, every parameter randomized with a fixed seed, lm_head untied), saved with
`save_pretrained`, and then rewritten by hand into OpenGVLab's original format:
- a Llama-backbone spec gives an InternLM2 checkpoint (q/k/v packed into `wqkv` per KV
  head, InternLM2 names, like InternVL2-2B/8B/26B) and a Llama one (like V1-2 / 40B);
- a Qwen2-backbone spec gives a Qwen2 checkpoint (like InternVL2-1B).
Plus a sharded variant (index + 2 shards) and the -hf checkpoint with the other key
layout: save_pretrained writes 4.5x names (`vision_tower.`, `language_model.model.`,
`language_model.lm_head.`), the variant uses the 5.x module names (`model.vision_tower.`, ...).

The -hf -> original conversion lives in compile/checkpoint/writer.py (written independently of
the loader: explicit per-head row copies, its own name tables), so the loader's tests are not circular.

Tokenizers: a tiny SentencePiece BPE model (InternLM2 / Llama style: tokenizer.model +
tokenizer_config.json + added_tokens.json) or a tiny byte-level BPE (Qwen2 style:
vocab.json + merges.txt + added_tokens.json), each followed by InternVL's 9 added tokens,
so <IMG_CONTEXT> has a real id and the LLM vocab is exactly the tokenizer's length.

Use `build_all(root)` (cached per directory) or the pytest fixtures in conftest.py.
"""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from internvl_aot.compile.checkpoint.writer import (  # noqa: F401  (re-exported for the tests)
    INTERNVL_TOKENS, TEMPLATES, _copy_tokenizer, hf_state_to_original, original_config, pack_wqkv_by_hand,
    read_safetensors_dir, to_module_layout, write_hf_module_layout, write_original, write_weights)


# Vision / LLM sizes shared by every spec. The 448 grid stays: 1 + 32*32 position embeddings.
VISION = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, image_size=448, patch_size=14,
              layer_norm_eps=1e-6)
LLM = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
           num_hidden_layers=2)


@dataclass(frozen=True)
class TinySpec:
    name: str
    text: str            # "llama" | "qwen2": the -hf backbone
    vit: str             # "300m": layer_norm, qkv bias, no qk-norm | "6b": rms_norm, no bias, qk-norm
    vision_layers: int
    select_layer: int    # = HF vision_feature_layer
    seed: int
    originals: tuple     # original-format LLM flavours written from it


SPECS = {s.name: s for s in [
    TinySpec("llama_vit300m", "llama", "300m", 2, -1, 11, ("internlm2", "llama")),
    TinySpec("llama_vit6b", "llama", "6b", 3, -2, 12, ("internlm2", "llama")),
    TinySpec("qwen2_vit300m", "qwen2", "300m", 3, -2, 13, ("qwen2",)),
    TinySpec("qwen2_vit6b", "qwen2", "6b", 2, -1, 14, ("qwen2",)),
]}


# Backbones added for InternVL2-4B / 2.5 / 3 / 3.5 (tests/test_models_new.py), built by build_new:
# - qwen3 (InternVL3.5): per-head q/k RMSNorm, no bias, head_dim 32 != hidden / heads = 16;
#   Qwen3-style tokenizer shipped as vocab.json + merges.txt *and* tokenizer.json;
# - phi3 (InternVL2-4B): fused qkv_proj / gate_up_proj, LongRoPE with short and long factors
#   (original_max_position_embeddings PHI3_ORIGINAL_MAX, so a short prompt crosses it while decoding),
#   SentencePiece tokenizer with Phi-3's added tokens, template phi3-chat.
# InternVL2.5/3 (Qwen2.5, InternLM2.5) reuse the qwen2 / InternLM2 specs above; Qwen2.5 is Qwen2's architecture.
NEW_SPECS = {s.name: s for s in [
    TinySpec("qwen3_vit300m", "qwen3", "300m", 2, -1, 21, ("qwen3",)),
    TinySpec("phi3_vit6b", "phi3", "6b", 2, -1, 22, ("phi3",)),
]}
PHI3_ORIGINAL_MAX = 64
PHI3_MAX_POSITION = 4096

# Every checkpoint dir build_all writes besides each spec's hf dir: (spec, key in original_dirs).
EXTRA_DIRS = [("llama_vit300m", "internlm2-sharded"), ("llama_vit6b", "hf-module-layout")]
VARIANTS = [(s.name, f) for s in SPECS.values() for f in s.originals] + EXTRA_DIRS


@dataclass
class TinyCheckpoint:
    spec: TinySpec
    hf_dir: Path                                               # as save_pretrained writes it
    original_dirs: dict = field(default_factory=dict)          # "internlm2"|"llama"|"qwen2" -> dir
    image_token_id: int = -1

    @property
    def name(self) -> str:
        return self.spec.name

    def load_hf_model(self, attn_implementation: str = "eager"):
        return load_hf_model(self.hf_dir, attn_implementation)


# ================================================================ tokenizers

_CORPUS = ["The quick brown fox jumps over the lazy dog.", "Describe the image in detail.",
           "What is shown in this picture?", "A cat sits on a red mat near the window.",
           "Hello, world! 123 456 7890", "InternVL is a vision language model.",
           "Please answer the question briefly.", "There are two people walking in the park."] * 30


def _added(first_id: int, names) -> dict:
    return {str(first_id + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True} for i, t in enumerate(names)}


def write_sentencepiece_tokenizer(out: Path) -> int:
    """InternLM2-style tokenizer: SP BPE with <|im_start|>/<|im_end|> inside, then InternVL's
    tokens. Returns the total vocab size."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=model, vocab_size=320, model_type="bpe",
        byte_fallback=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"], character_coverage=1.0,
        normalization_rule_name="identity", num_threads=1, hard_vocab_limit=False, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    base = sp.get_piece_size()
    decoder = _added(0, ["<unk>"]) | _added(1, ["<s>"]) | _added(2, ["</s>"]) | _added(base, INTERNVL_TOKENS)
    for t in ("<|im_start|>", "<|im_end|>"):  # pieces of the SP model, listed like InternLM2's
        decoder |= _added(sp.piece_to_id(t), [t])
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "added_tokens_decoder": decoder,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 8192,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"] + INTERNVL_TOKENS}, indent=2))
    (out / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(INTERNVL_TOKENS)}))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))
    return base + len(INTERNVL_TOKENS)


def write_bpe_tokenizer(out: Path) -> int:
    """Qwen2-style tokenizer: byte-level BPE vocab.json + merges.txt, then <|endoftext|>,
    <|im_start|>, <|im_end|>, then InternVL's tokens, listed in added_tokens.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.model.save(str(out))  # vocab.json, merges.txt
    base = tok.get_vocab_size()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + INTERNVL_TOKENS
    (out / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(specials)}))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": _added(base, specials),
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 8192, "additional_special_tokens": specials[1:]}, indent=2))
    return base + len(specials)


PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]


def write_phi3_tokenizer(out: Path) -> int:
    """Phi-3-style tokenizer: a Llama SentencePiece model (<unk>, <s>, </s>, byte fallback), Phi-3's
    11 added tokens after the base pieces (<|endoftext|> first, <|end|> and <|user|> among them),
    then InternVL's 9; LlamaTokenizer with legacy=False, EOS <|endoftext|> (Phi-3-mini's
    tokenizer_config; InternVL2-4B's own values are unverified). Returns the total vocab size."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=model, vocab_size=330, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", num_threads=1,
        hard_vocab_limit=False, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    base = sp.get_piece_size()
    extra = PHI3_ADDED + INTERNVL_TOKENS
    decoder = _added(0, ["<unk>"]) | _added(1, ["<s>"]) | _added(2, ["</s>"]) | _added(base, extra)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": decoder, "legacy": False,
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 8192,
        "additional_special_tokens": INTERNVL_TOKENS}, indent=2))
    (out / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(extra)}))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"}))
    return base + len(extra)


def write_tokenizer_json(out: Path):
    """tokenizer.json next to vocab.json + merges.txt (Qwen2.5 / Qwen3 checkpoints ship both):
    the same byte-level BPE with Qwen2's split rule and NFC, and the added tokens."""
    from internvl_aot.runtime.tokenizer import Tokenizer as OurTokenizer
    hf = OurTokenizer.from_dir(out)._hf
    hf.save(str(out / "tokenizer.json"))


# ================================================================ the -hf checkpoint

def _randomize(model: torch.nn.Module, seed: int):
    """Non-trivial values for every parameter (transformers leaves ones/zeros/constants in
    norms, layer scales, biases, cls/position embeddings), so no mapping bug can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda_" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)            # layer scale 0.1..1
            elif "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)                  # norms 0.5..1.5
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() >= 2 and "embed" not in name and "cls_token" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)               # embeddings, cls, pos


def build_hf_checkpoint(spec: TinySpec, out: Path) -> int:
    """Write a tiny random -hf checkpoint (+ tokenizer) of `spec` into `out`; return the
    image token id."""
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, LlamaConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)
    out.mkdir(parents=True, exist_ok=True)
    if spec.text == "qwen3":
        vocab = write_bpe_tokenizer(out)
        write_tokenizer_json(out)
        base = vocab - len(INTERNVL_TOKENS)
        text = Qwen3Config(vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=40960,
                           rope_theta=1_000_000.0, tie_word_embeddings=False, use_sliding_window=False,
                           attention_bias=False, bos_token_id=None, eos_token_id=base - 1,
                           **dict(LLM, head_dim=32))
    elif spec.text == "phi3":
        vocab = write_phi3_tokenizer(out)
        base = vocab - len(INTERNVL_TOKENS)
        g = torch.Generator().manual_seed(spec.seed)
        hd = LLM["hidden_size"] // LLM["num_attention_heads"]
        short = (1 + torch.rand(hd // 2, generator=g) * 0.5).tolist()
        long = (1 + torch.rand(hd // 2, generator=g) * 20).tolist()
        text = Phi3Config(vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=PHI3_MAX_POSITION,
                          original_max_position_embeddings=PHI3_ORIGINAL_MAX, sliding_window=None,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                                           "long_factor": long,
                                           "original_max_position_embeddings": PHI3_ORIGINAL_MAX},
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=base, pad_token_id=base, **LLM)
    elif spec.text == "llama":
        vocab = write_sentencepiece_tokenizer(out)
        base = vocab - len(INTERNVL_TOKENS)
        text = LlamaConfig(vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=32768,
                           rope_theta=1_000_000.0, rope_scaling={"type": "dynamic", "factor": 2.0},
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **LLM)
    else:
        vocab = write_bpe_tokenizer(out)
        base = vocab - len(INTERNVL_TOKENS)
        text = Qwen2Config(vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=32768,
                           rope_theta=1_000_000.0, tie_word_embeddings=False, use_sliding_window=False,
                           bos_token_id=None, eos_token_id=base - 1, **LLM)
    image_token_id = base + INTERNVL_TOKENS.index("<IMG_CONTEXT>")
    vit6b = spec.vit == "6b"
    vision = dict(VISION, num_hidden_layers=spec.vision_layers, norm_type="rms_norm" if vit6b else "layer_norm",
                  attention_bias=not vit6b, use_qk_norm=vit6b, hidden_act="gelu")
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                         downsample_ratio=0.5, projector_hidden_act="gelu",
                         vision_feature_layer=spec.select_layer, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)  # top level: transformers 5 ties otherwise
    torch.manual_seed(spec.seed)
    model = InternVLForConditionalGeneration(cfg)
    _randomize(model, spec.seed)
    model.save_pretrained(out)
    return image_token_id


def load_hf_model(hf_dir: Path, attn_implementation: str = "eager"):
    """The transformers model of an -hf dir, fp32, eval, checked to hold exactly the file's weights."""
    from transformers import InternVLForConditionalGeneration
    model = InternVLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation=attn_implementation).eval()
    sd = model.state_dict()
    disk = to_module_layout(read_safetensors_dir(Path(hf_dir)))
    assert set(disk) == set(sd), set(disk) ^ set(sd)
    for k, x in disk.items():
        assert torch.equal(x, sd[k]), f"transformers did not load {k} from {hf_dir}"
    return model


# ================================================================ all of them

_CACHE: dict = {}


def _build_specs(specs: dict, root: Path) -> dict[str, TinyCheckpoint]:
    """root/<spec>/hf and root/<spec>/original-<flavour> for each spec."""
    out = {}
    for spec in specs.values():
        base = root / spec.name
        ck = TinyCheckpoint(spec, base / "hf")
        ck.image_token_id = build_hf_checkpoint(spec, ck.hf_dir)
        for flavour in spec.originals:
            ck.original_dirs[flavour] = write_original(ck.hf_dir, base / f"original-{flavour}", flavour)
        out[spec.name] = ck
    return out


def build_all(root: Path) -> dict[str, TinyCheckpoint]:
    """Every spec under `root` (built once per root per process):
    root/<spec>/hf, root/<spec>/original-<flavour>; also root/llama_vit300m/original-internlm2-sharded
    (2 shards) and root/llama_vit6b/hf-module-layout, reachable as extra entries of original_dirs."""
    root = Path(root)
    if root in _CACHE:
        return _CACHE[root]
    out = _build_specs(SPECS, root)
    ck = out["llama_vit300m"]
    ck.original_dirs["internlm2-sharded"] = write_original(
        ck.hf_dir, root / "llama_vit300m" / "original-internlm2-sharded", "internlm2", shards=2)
    out["llama_vit6b"].original_dirs["hf-module-layout"] = write_hf_module_layout(
        out["llama_vit6b"].hf_dir, root / "llama_vit6b" / "hf-module-layout")
    _CACHE[root] = out
    return out


def build_new(root: Path) -> dict[str, TinyCheckpoint]:
    """NEW_SPECS under `root` (once per root per process): root/<spec>/hf and root/<spec>/original-<flavour>;
    also root/qwen3_vit300m/original-qwen3-vocab (its tokenizer as vocab.json + merges.txt only)."""
    root = Path(root)
    key = ("new", root)
    if key in _CACHE:
        return _CACHE[key]
    out = _build_specs(NEW_SPECS, root)
    ck = out["qwen3_vit300m"]
    d = shutil.copytree(ck.original_dirs["qwen3"], root / "qwen3_vit300m" / "original-qwen3-vocab")
    (d / "tokenizer.json").unlink()
    ck.original_dirs["qwen3-vocab"] = d
    _CACHE[key] = out
    return out
