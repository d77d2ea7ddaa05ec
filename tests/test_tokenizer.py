"""Tokenizer: ids against the sentencepiece library, transformers' slow-tokenizer semantics and transformers 5.x.

Checkpoint-like tokenizer directories are built here from tiny models trained on a generated corpus:
- SentencePiece BPE with byte fallback, InternLM2's special tokens as user-defined symbols and InternVL's added
  tokens after the vocabulary (added_tokens.json), like InternVL2-2B/8B;
- the same with Llama's `legacy: false` (Phi-3 / Yi style);
- an `nmt_nfkc` SentencePiece model, where transformers 5.x disagrees with sentencepiece (documented below);
- tokenizer.json files written by transformers;
- Qwen2 byte-level BPE as vocab.json + merges.txt + added_tokens.json (InternVL2-1B).

Known, asserted differences (sentencepiece is the truth: the original InternVL ran the `sentencepiece`
library itself, under transformers 4.3x-4.4x, with its normalizer rules):
1. transformers 5.x converts a `tokenizer.model` into a `tokenizers` BPE with a Metaspace pre-tokenizer and no
   normalizer. For an `identity` model without extra-whitespace removal (Llama/InternLM2 style) it gives the
   same ids as sentencepiece, except for a text segment that starts with whitespace: Metaspace does not put the
   dummy prefix "▁" before a segment that already starts with "▁", sentencepiece does (one "▁" id more).
2. For an `nmt_nfkc` model, transformers 5.x skips sentencepiece's normalizer: no NFKC (full-width letters,
   circled digits fall back to bytes), newlines and tabs are kept (sentencepiece makes them spaces), runs of
   spaces are kept (sentencepiece collapses them).
3. transformers 5.x `AutoTokenizer`/`LlamaTokenizer` has no slow (sentencepiece) Llama tokenizer any more, and
   re-instantiating `LlamaTokenizer` from a saved tokenizer.json rebuilds its pre-tokenizer with `legacy=False`
   (the config it saves has no `legacy`), so the tokenizer.json tests compare with `PreTrainedTokenizerFast`,
   which uses the file as written. The slow semantics (InternLM2Tokenizer, LlamaTokenizer legacy=False of
   transformers 4.x) are rebuilt below on transformers' own `SentencePieceBackend`.
"""

import json
import random
import re
import shutil
import warnings

import pytest

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from internvl_aot.runtime.templates import build_prompt  # noqa: E402
from internvl_aot.runtime.tokenizer import SPIECE_UNDERLINE, Tokenizer, _without_dummy_prefix  # noqa: E402

INTERNLM2_SPECIALS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                      "<|im_start|>"]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]

TEXTS = [
    "Hello world",
    "the quick brown fox jumps over the lazy dog.",
    "你好世界，这是一个图片",
    "emoji 😀🎉 and 中文 mixed",
    "line one\nline two\n\nend\n",
    "multiple   spaces  inside  ",
    "tab\there",
    "rare 龘 char",
    "<|im_start|>user\nhello<|im_end|>",
    "x<s>y</s>z",
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe the image.",
    "<ref>the dog</ref><box>[[10, 20, 300, 400]]</box>",
    "<|action_start|><|plugin|>\n{}<|action_end|>",
    build_prompt("internlm2-chat", "这是什么? What is in it 😀", [2], num_image_token=3),
    build_prompt("internvl2_5", "Compare  them.\n", [1, 1], num_image_token=2,
                 history=[("Hi", "Hello! 你好")]),
]
# text segments starting with whitespace: transformers 5.x differs from sentencepiece (difference 1 above)
LEADING_WS = ["  two leading spaces", " one", "<|im_start|> after special", "\u2581underline"]

STREAM_TEXT = "你好世界 😀🎉 the image shows 一只龘 cat 👍🏽 end"


def _corpus(path):
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog image describe picture what is in this please tell me "
             "about a an and of to you are helpful assistant hello world model vision language token").split()
    zh = "你好世界这是一个图片请描述中的内容我们人工智能助手上海实验室书生多模态大模型"
    lines = []
    for i in range(2000):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
        if i % 3 == 0:
            s += " " + "".join(rng.choice(zh) for _ in range(rng.randint(2, 10)))
        if i % 7 == 0:
            s = s.capitalize() + "."
        lines.append(s)
    path.write_text("\n".join(lines), encoding="utf-8")


def _train_sp(corpus, prefix, rule, **kw):
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name=rule, character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, user_defined_symbols=INTERNLM2_SPECIALS, minloglevel=2, **kw)
    return prefix.with_suffix(".model")


def _sp_checkpoint(d, model, tokenizer_class="InternLM2Tokenizer", legacy=None):
    """A tokenizer dir shaped like InternVL2-2B's: tokenizer.model, tokenizer_config.json, added_tokens.json,
    special_tokens_map.json."""
    d.mkdir()
    shutil.copy(model, d / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    n = sp.get_piece_size()
    decoder = {"0": "<unk>", "1": "<s>", "2": "</s>"}
    decoder.update({str(sp.piece_to_id(t)): t for t in INTERNLM2_SPECIALS})
    added = {t: n + i for i, t in enumerate(INTERNVL_TOKENS)}
    decoder.update({str(i): t for t, i in added.items()})
    config = {
        "tokenizer_class": tokenizer_class, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "added_tokens_decoder": {i: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True} for i, t in decoder.items()},
        "additional_special_tokens": INTERNLM2_SPECIALS + INTERNVL_TOKENS,
        "clean_up_tokenization_spaces": False,
    }
    if legacy is not None:
        config["legacy"] = legacy
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
    (d / "added_tokens.json").write_text(json.dumps(added))
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "additional_special_tokens": INTERNLM2_SPECIALS + INTERNVL_TOKENS}))
    return d


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    _corpus(root / "corpus.txt")
    identity = _train_sp(root / "corpus.txt", root / "identity", "identity", remove_extra_whitespaces=False)
    nfkc = _train_sp(root / "corpus.txt", root / "nfkc", "nmt_nfkc")
    return {
        "root": root,
        "corpus": root / "corpus.txt",
        "identity_model": identity,
        "nfkc_model": nfkc,
        "internlm2": _sp_checkpoint(root / "internlm2", identity),
        "nonlegacy": _sp_checkpoint(root / "nonlegacy", identity, "LlamaTokenizer", legacy=False),
        "nfkc": _sp_checkpoint(root / "nfkc_ckpt", nfkc),
    }


# ---------------------------------------------------------------------------------------------------------------
# transformers 4.x slow-tokenizer semantics, rebuilt on transformers 5.x's SentencePieceBackend (its added-token
# splitting is transformers' own; only the per-class methods below are transcribed from 4.x).


def _oracles():
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class InternLM2Slow(SentencePieceBackend):
        """InternLM2Tokenizer (remote code of InternVL2): each text segment goes through sp.encode as is."""

        def __init__(self, vocab_file, **kw):
            kw["legacy"] = True
            super().__init__(vocab_file=vocab_file, **kw)

        def _tokenize(self, text, **kw):
            return self.sp_model.encode(text, out_type=str)

        def build_inputs_with_special_tokens(self, ids0, ids1=None):
            return [self.bos_token_id] + ids0

    class LlamaSlowNonLegacy(SentencePieceBackend):
        """transformers 4.x LlamaTokenizer with legacy=False (SentencePieceBackend loads the model without the
        dummy prefix and carries 4.x's `_tokenize`; `tokenize` is 4.x's LlamaTokenizer.tokenize)."""

        def __init__(self, vocab_file, **kw):
            kw["legacy"] = False
            super().__init__(vocab_file=vocab_file, **kw)

        def tokenize(self, text, **kw):
            if len(text) == 0:
                return super().tokenize(text, **kw)
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
            tokens = super().tokenize(text, **kw)
            if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
                tokens = tokens[1:]
            return tokens

        def build_inputs_with_special_tokens(self, ids0, ids1=None):
            return [self.bos_token_id] + ids0

    return InternLM2Slow, LlamaSlowNonLegacy


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


@pytest.fixture(scope="session")
def oracles():
    return _oracles()


def _pieces(tok, ids):
    return [tok.id_to_token(i) for i in ids]


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece backend


def test_internlm2_vocab_and_special_ids(work):
    tok = Tokenizer.from_dir(work["internlm2"])
    sp = spm.SentencePieceProcessor(model_file=str(work["identity_model"]))
    n = sp.get_piece_size()
    assert tok.backend == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.vocab_size == n + len(INTERNVL_TOKENS)
    assert tok.token_to_id("<img>") == n and tok.token_to_id("<IMG_CONTEXT>") == n + 2
    assert tok.token_to_id("<|im_end|>") == sp.piece_to_id("<|im_end|>")
    assert tok.token_to_id("<0x0A>") == sp.piece_to_id("<0x0A>")
    assert tok.token_to_id("no such piece") is None
    assert tok.id_to_token(n + 8) == "</box>"
    assert tok.encode("hi", add_bos=False) == sp.encode("hi")
    assert tok.encode("hi") == [1] + sp.encode("hi")


def test_internlm2_matches_sentencepiece_library(work):
    """Added tokens split out, every other segment encoded by the sentencepiece library itself."""
    tok = Tokenizer.from_dir(work["internlm2"])
    sp = spm.SentencePieceProcessor(model_file=str(work["identity_model"]))
    split = sorted(INTERNLM2_SPECIALS + INTERNVL_TOKENS + ["<s>", "</s>", "<unk>"], key=len, reverse=True)
    pattern = re.compile("(" + "|".join(map(re.escape, split)) + ")")
    for text in TEXTS + LEADING_WS:
        want = [1]
        for seg in pattern.split(text):
            if seg in split:
                want.append(tok.token_to_id(seg))
            elif seg:
                want += sp.encode(seg)
        assert tok.encode(text) == want, text


def test_internlm2_matches_slow_tokenizer_semantics(work, oracles):
    internlm2_slow, _ = oracles
    ref = _quiet(internlm2_slow.from_pretrained, str(work["internlm2"]))
    tok = Tokenizer.from_dir(work["internlm2"])
    for text in TEXTS + LEADING_WS:
        assert tok.encode(text) == ref.encode(text), text


def test_internlm2_vs_transformers5_fast(work):
    """transformers 5.x LlamaTokenizer (tokenizers conversion of tokenizer.model, legacy=True as InternLM2 is)."""
    ref = _quiet(transformers.LlamaTokenizer.from_pretrained, str(work["internlm2"]), legacy=True)
    tok = Tokenizer.from_dir(work["internlm2"])
    underline = tok.token_to_id(SPIECE_UNDERLINE)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=True, clean_up_tokenization_spaces=False) == \
            ref.decode(ref.encode(text), skip_special_tokens=True), text
    # known difference 1: a segment starting with whitespace gets one more "▁" from sentencepiece
    for text in LEADING_WS:
        ours, theirs = tok.encode(text), ref.encode(text)
        assert ours != theirs, text
        k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        assert ours[k] == underline and ours[:k] + ours[k + 1:] == theirs, (text, _pieces(tok, ours))


def test_nonlegacy_llama_matches_slow_semantics_and_transformers5(work, oracles):
    _, llama_slow = oracles
    ref_slow = _quiet(llama_slow.from_pretrained, str(work["nonlegacy"]))
    ref_fast = _quiet(transformers.LlamaTokenizer.from_pretrained, str(work["nonlegacy"]))
    assert ref_fast.legacy is False
    tok = Tokenizer.from_dir(work["nonlegacy"])
    sp = spm.SentencePieceProcessor(model_file=str(work["identity_model"]))
    for text in TEXTS + LEADING_WS:
        assert tok.encode(text) == ref_slow.encode(text), text
    for text in TEXTS + ["<|im_start|> after special"]:
        assert tok.encode(text) == ref_fast.encode(text), text
    # non-legacy: no dummy prefix after an added token, one at the start of the text (dropped before a special)
    assert tok.encode("<s>user") == [1, 1] + sp.encode("user")[1:]
    assert tok.encode("<|im_end|>user", add_bos=False) == [tok.token_to_id("<|im_end|>")] + sp.encode("user")[1:]
    legacy = Tokenizer.from_dir(work["internlm2"])
    assert legacy.encode("<|im_end|>user", add_bos=False) == [tok.token_to_id("<|im_end|>")] + sp.encode("user")


def test_without_dummy_prefix_matches_protobuf(work):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    raw = open(work["identity_model"], "rb").read()
    want = pb.ModelProto.FromString(raw)
    assert want.normalizer_spec.add_dummy_prefix
    want.normalizer_spec.add_dummy_prefix = False
    got = pb.ModelProto.FromString(_without_dummy_prefix(raw))
    assert got == want


def test_nmt_nfkc_follows_sentencepiece_not_transformers5(work):
    """Known difference 2: sentencepiece's normalizer applies; transformers 5.x skips it."""
    tok = Tokenizer.from_dir(work["nfkc"])
    sp = spm.SentencePieceProcessor(model_file=str(work["nfkc_model"]))
    ref = _quiet(transformers.LlamaTokenizer.from_pretrained, str(work["nfkc"]), legacy=True)
    for text in ["hello world", "a\nb", "two  spaces", "ｆｕｌｌ ｗｉｄｔｈ", "①", "tab\there", "你好 😀"]:
        assert tok.encode(text) == [1] + sp.encode(text), text
    same = ["hello world", "你好 😀"]
    differ = ["a\nb", "two  spaces", "ｆｕｌｌ ｗｉｄｔｈ", "①", "tab\there"]
    for text in same:
        assert tok.encode(text) == ref.encode(text), text
    for text in differ:
        assert tok.encode(text) != ref.encode(text), text
    # what sentencepiece does: newline -> space, full width -> ASCII, ① -> 1
    assert tok.encode("a\nb") == tok.encode("a b")
    assert tok.encode("ｆｕｌｌ") == tok.encode("full")
    assert tok.encode("two  spaces") == tok.encode("two spaces")
    assert tok.decode(tok.encode("①", add_bos=False)) == "1"
    # what transformers 5.x does: the newline stays a byte-fallback piece
    assert "<0x0A>" in ref.convert_ids_to_tokens(ref.encode("a\nb"))


def test_sentencepiece_decode(work):
    tok = Tokenizer.from_dir(work["internlm2"])
    for text in TEXTS + LEADING_WS[:3]:
        assert tok.decode(tok.encode(text, add_bos=False), clean_up_tokenization_spaces=False) == text, text
    ids = tok.encode("😀")
    assert _pieces(tok, ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.decode(ids) == "<s>😀"
    assert tok.decode(ids, skip_special_tokens=True) == "😀"
    prompt = "<|im_start|>assistant\nA cat.<|im_end|>"
    assert tok.decode(tok.encode(prompt), skip_special_tokens=True) == "assistant\nA cat."


CLEANUP_TEXT = "Yes , it 's a cat . Isn 't it ? They 're here ' ok ' ! I 'm sure n't"


def test_internlm2_decode_cleans_up_tokenization_spaces(work):
    """InternLM2Tokenizer.convert_tokens_to_string applies transformers' clean_up_tokenization on every decode
    (whatever clean_up_tokenization_spaces says); LlamaTokenizer follows the config (False here)."""
    tok = Tokenizer.from_dir(work["internlm2"])
    ids = tok.encode(CLEANUP_TEXT, add_bos=False)
    assert tok.clean_up_tokenization_spaces
    cleaned = transformers.PreTrainedTokenizerBase.clean_up_tokenization(None, CLEANUP_TEXT)
    assert cleaned == "Yes, it's a cat. Isn 't it? They're here'ok '! I'm suren't"
    assert tok.decode(ids) == cleaned
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == CLEANUP_TEXT
    llama = Tokenizer.from_dir(work["nonlegacy"])
    assert not llama.clean_up_tokenization_spaces
    assert llama.decode(llama.encode(CLEANUP_TEXT, add_bos=False)) == CLEANUP_TEXT


def test_stream_with_cleanup_never_takes_text_back(work):
    tok = Tokenizer.from_dir(work["internlm2"])
    rng = random.Random(0)
    pool = list(" .'ntsmvrea?,!") + [" ' ", " n't", " 's", "<|im_end|>", "😀", "你"]
    texts = [CLEANUP_TEXT] + ["".join(rng.choice(pool) for _ in range(30)) for _ in range(200)]
    for text in texts:
        ids = tok.encode(text, add_bos=False)
        for skip in (False, True):
            stream = tok.stream(skip_special_tokens=skip)
            out = "".join(stream.feed(i) for i in ids) + stream.finish()
            assert out == tok.decode(ids, skip_special_tokens=skip), text


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.json and Qwen2 byte-level BPE


@pytest.fixture(scope="session")
def json_dir(work):
    """tokenizer.json + tokenizer_config.json as transformers 5.x writes them (no tokenizer.model)."""
    ref = _quiet(transformers.LlamaTokenizer.from_pretrained, str(work["internlm2"]), legacy=True)
    d = work["root"] / "json"
    ref.save_pretrained(str(d))
    (d / "tokenizer.model").unlink(missing_ok=True)
    return d


def test_tokenizer_json_matches_transformers_fast(json_dir):
    tok = Tokenizer.from_dir(json_dir)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(json_dir / "tokenizer.json"))
    assert tok.backend == "tokenizers"
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.token_to_id("<IMG_CONTEXT>") == ref.convert_tokens_to_ids("<IMG_CONTEXT>")
    for text in TEXTS + LEADING_WS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == 1
        assert tok.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids), text


@pytest.fixture(scope="session")
def qwen_dir(work):
    """InternVL2-1B-shaped: Qwen2 byte-level BPE as vocab.json + merges.txt + added_tokens.json, no tokenizer.json."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from internvl_aot.runtime.tokenizer import QWEN2_PRETOKENIZE_REGEX

    t = HFTokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train([str(work["corpus"])], trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    d = work["root"] / "qwen"
    d.mkdir()
    t.model.save(str(d))
    n = t.get_vocab_size()
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + INTERNVL_TOKENS
    added = {s: n + i for i, s in enumerate(names)}
    (d / "added_tokens.json").write_text(json.dumps(added))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "split_special_tokens": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for s, i in added.items()},
    }))
    return d


def test_qwen2_bpe_matches_transformers(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    ref = _quiet(transformers.Qwen2Tokenizer.from_pretrained, str(qwen_dir))
    assert tok.backend == "tokenizers" and not (qwen_dir / "tokenizer.json").exists()
    assert tok.bos_id is None and tok.eos_id == ref.convert_tokens_to_ids("<|im_end|>")
    assert tok.vocab_size == len(ref)
    prompt = build_prompt("internvl2_5", "What is 12+34? 你好 I'm here", [1], num_image_token=2)
    for text in TEXTS + LEADING_WS + ["cafe\u0301 NFC", "I'm 12345 it's", "a\r\n\r\nb", prompt]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")  # NFC


def test_qwen2_tokenizer_json(qwen_dir, work):
    """A tokenizer.json written by transformers' Qwen2Tokenizer (the -hf checkpoints' form)."""
    ref = _quiet(transformers.Qwen2Tokenizer.from_pretrained, str(qwen_dir))
    d = work["root"] / "qwen_json"
    ref.save_pretrained(str(d))
    for f in ("vocab.json", "merges.txt"):
        (d / f).unlink(missing_ok=True)
    tok = Tokenizer.from_dir(d)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text


# ---------------------------------------------------------------------------------------------------------------
# streaming and errors


@pytest.mark.parametrize("which", ["internlm2", "nonlegacy", "json", "qwen"])
@pytest.mark.parametrize("skip", [False, True])
def test_stream_decode(which, skip, work, json_dir, qwen_dir):
    d = {"json": json_dir, "qwen": qwen_dir}.get(which) or work[which]
    tok = Tokenizer.from_dir(d)
    ids = tok.encode(STREAM_TEXT + "<|im_end|>" + " 再见 🎉", add_bos=False)
    stream = tok.stream(skip_special_tokens=skip)
    deltas = [stream.feed(i) for i in ids]
    deltas.append(stream.finish())
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert stream.text == tok.decode(ids, skip_special_tokens=skip)
    assert sum(1 for d in deltas if d == "") >= 3  # multi-byte characters were held back


@pytest.mark.parametrize("which", ["internlm2", "nonlegacy"])
def test_stream_incomplete_tail_is_flushed(work, which):
    tok = Tokenizer.from_dir(work[which])
    ids = tok.encode("ok 😀", add_bos=False)[:-1]  # cut inside the emoji
    stream = tok.stream()
    held = "".join(stream.feed(i) for i in ids)
    # the incomplete emoji is held back (and, with InternLM2's clean-up, the space before it)
    assert held == ("ok" if which == "internlm2" else "ok ")
    tail = stream.finish()
    assert held + tail == tok.decode(ids) and tail.endswith("\ufffd")


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json.*vocab.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path / "absent")
