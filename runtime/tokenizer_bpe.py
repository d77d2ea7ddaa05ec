"""Qwen2's byte-level BPE from vocab.json + merges.txt (no tokenizer.json), rebuilt with the `tokenizers`
library: Qwen2's pre-tokenizer split rule, NFC, a ByteLevel decoder."""
from __future__ import annotations

from pathlib import Path

from .tokenizer_files import _Config


# Qwen2's pre-tokenizer split rule (same as transformers' Qwen2Tokenizer).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# --------------------------------------------------------------------------------------------------------------
# Qwen2 byte-level BPE from vocab.json + merges.txt


def _build_byte_level_bpe(d: Path, cfg: _Config):
    from tokenizers import AddedToken as HFAddedToken
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    model = BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt"), dropout=None, unk_token=None,
                          continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                          byte_fallback=False)
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()

    # Added tokens, in id order so that the ids the library assigns are the checkpoint's.
    added = dict(cfg.added)
    specials = set(cfg.named.values()) | set(cfg.additional_special)
    for content in specials:
        if content and content not in {t.content for t in added.values()} and tok.token_to_id(content) is None:
            raise ValueError(f"special token {content!r} has no id in {d}")
    for tid in sorted(added):
        t = added[tid]
        hf_tok = HFAddedToken(t.content, single_word=False, lstrip=t.lstrip, rstrip=t.rstrip,
                              normalized=t.normalized, special=t.special or t.content in specials)
        if hf_tok.special:
            tok.add_special_tokens([hf_tok])
        else:
            tok.add_tokens([hf_tok])
        got = tok.token_to_id(t.content)
        if got != tid:
            raise ValueError(
                f"added token {t.content!r} should have id {tid} but the vocabulary in {d} gives it {got}: "
                "added tokens must follow vocab.json's ids without gaps"
            )
    return tok
