"""A stand-in tokenizer for WEIGHTS=random builds (no real tokenizer can be downloaded here).

Byte-level BPE without merges (one token per UTF-8 byte), the vocabulary padded to the
model's size with unused tokens, and InternVL's special tokens; `<IMG_CONTEXT>` sits at the
real model's id when the registry knows it. Prompts therefore cost about one token per byte:
benchmarks state their token counts, not their characters.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..graphs.config import ModelConfig
from ..runtime import templates

SPECIALS = ["<img>", "</img>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
            "<|im_start|>", "<|im_end|>", "<|end|>", "<|action_start|>", "<|action_end|>"]


def write_synthetic_tokenizer(cfg: ModelConfig, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab_size = cfg.llm.vocab_size
    alphabet = ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    img_ctx = cfg.image_context_token_id if 0 <= cfg.image_context_token_id < vocab_size else vocab_size - 1
    special_ids = {templates.IMG_CONTEXT_TOKEN: img_ctx}
    next_id = vocab_size - 2
    for tok in SPECIALS:
        while next_id == img_ctx:
            next_id -= 1
        special_ids[tok] = next_id
        next_id -= 1
    if min(special_ids.values()) <= len(vocab):
        raise ValueError(f"vocabulary of {vocab_size} is too small for a synthetic tokenizer")
    by_id = {i: t for t, i in special_ids.items()}
    for i in range(len(vocab), vocab_size):
        vocab[by_id.get(i, f"<|unused{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<s>", "</s>", "<unk>"] + list(special_ids)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.llm.max_position_embeddings,
    }, indent=1))
    return out
