"""Tokenizer for InternVL checkpoints, without transformers.

Three kinds of checkpoint files, tried in this order:

1. ``tokenizer.model`` (SentencePiece; InternLM2Tokenizer, LlamaTokenizer). The original InternVL ran these
   with transformers 4.x "slow" tokenizers (``use_fast=False``): added tokens are split out of the text first
   (leftmost, longest match), and every other piece of text is encoded by the sentencepiece library itself,
   so sentencepiece's own normalizer rules apply. ``legacy: false`` (Llama's non-legacy mode) is reproduced:
   the dummy prefix is added once at the start of the text, not after every added token.
2. ``tokenizer.json`` through the ``tokenizers`` library.
3. ``vocab.json`` + ``merges.txt`` (Qwen2's byte-level BPE without a ``tokenizer.json``, e.g. InternVL2-1B),
   rebuilt with the ``tokenizers`` library using Qwen2's pre-tokenizer split rule, NFC and a ByteLevel decoder.

Added and special tokens come from ``tokenizer_config.json`` (``added_tokens_decoder``, ``bos_token`` ...),
``added_tokens.json`` and ``special_tokens_map.json``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .tokenizer_bpe import QWEN2_PRETOKENIZE_REGEX, _build_byte_level_bpe  # noqa: F401  (re-exported)
from .tokenizer_files import SPIECE_UNDERLINE, _CLEANUP_UNSAFE_END, AddedToken, _Config, clean_up_tokenization  # noqa: F401
from .tokenizer_sentencepiece import _SentencePieceBackend, _without_dummy_prefix  # noqa: F401


# --------------------------------------------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """Encode/decode for one checkpoint. Build with ``Tokenizer.from_dir(path)``."""

    def __init__(self, *, backend: str, cfg: _Config, sp: _SentencePieceBackend | None = None, hf=None,
                 source: str = ""):
        self.backend = backend  # "sentencepiece" | "tokenizers"
        self.source = source  # the file it was built from
        self._cfg = cfg
        self._sp = sp
        self._hf = hf
        tc = cfg.tokenizer_config

        # added tokens by content, with ids; named special tokens resolve through them or the base vocabulary
        self._added: dict[str, AddedToken] = {t.content: t for t in cfg.added.values()}
        self._added_by_id: dict[int, AddedToken] = {t.id: t for t in cfg.added.values()}

        self.bos_token = cfg.named.get("bos_token")
        self.eos_token = cfg.named.get("eos_token")
        self.unk_token = cfg.named.get("unk_token")
        self.pad_token = cfg.named.get("pad_token")
        if backend == "sentencepiece":
            if self.bos_token is None and sp.sp.bos_id() >= 0:
                self.bos_token = sp.sp.id_to_piece(sp.sp.bos_id())
            if self.eos_token is None and sp.sp.eos_id() >= 0:
                self.eos_token = sp.sp.id_to_piece(sp.sp.eos_id())
            if self.unk_token is None and sp.sp.unk_id() >= 0:
                self.unk_token = sp.sp.id_to_piece(sp.sp.unk_id())
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.token_to_id(self.eos_token) if self.eos_token else None
        self.unk_id = self.token_to_id(self.unk_token) if self.unk_token else None
        self.pad_id = self.token_to_id(self.pad_token) if self.pad_token else None

        # the tokens transformers 4.x calls `all_special_tokens` (named + additional_special_tokens)
        self._named_special = {t for t in (*cfg.named.values(), *cfg.additional_special) if t}
        special_ids = {self.token_to_id(t) for t in self._named_special}
        special_ids |= {t.id for t in cfg.added.values() if t.special}
        if hf is not None:
            special_ids |= {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self.special_ids: frozenset[int] = frozenset(i for i in special_ids if i is not None)

        if backend == "sentencepiece":
            # text that is split out before SentencePiece runs: added tokens and the named special tokens
            self._split: dict[str, int] = {t.content: t.id for t in cfg.added.values()}
            for t in self._named_special:
                if t not in self._split and self.token_to_id(t) is not None:
                    self._split[t] = self.token_to_id(t)
            self._split_first = {}
            for content in self._split:
                self._split_first.setdefault(content[0], []).append(content)
            for v in self._split_first.values():
                v.sort(key=len, reverse=True)
            # InternLM2Tokenizer.convert_tokens_to_string calls clean_up_tokenization whatever the config says
            self.clean_up_tokenization_spaces = sp.internlm2 or bool(tc.get("clean_up_tokenization_spaces", False))
            self.add_bos_token = bool(tc.get("add_bos_token", True))
            self.add_eos_token = bool(tc.get("add_eos_token", False))
        else:
            # an explicit config value wins over the tokenizer.json post-processor, as in transformers 4.x
            self.clean_up_tokenization_spaces = bool(tc.get("clean_up_tokenization_spaces", False))
            self.add_bos_token = tc.get("add_bos_token")
            self.add_eos_token = tc.get("add_eos_token")

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {d}")
        cfg = _Config.load(d)
        if (d / "tokenizer.model").is_file():
            return cls(backend="sentencepiece", cfg=cfg, sp=_SentencePieceBackend(d / "tokenizer.model", cfg),
                       source=str(d / "tokenizer.model"))
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            return cls(backend="tokenizers", cfg=cfg, hf=HFTokenizer.from_file(str(d / "tokenizer.json")),
                       source=str(d / "tokenizer.json"))
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return cls(backend="tokenizers", cfg=cfg, hf=_build_byte_level_bpe(d, cfg),
                       source=str(d / "vocab.json"))
        present = sorted(p.name for p in d.iterdir())
        raise FileNotFoundError(
            f"no tokenizer in {d}: expected tokenizer.model (SentencePiece), tokenizer.json, or vocab.json + "
            f"merges.txt (byte-level BPE); found {present}"
        )

    # ---------------------------------------------------------------------------------------------- vocabulary

    def token_to_id(self, token: str) -> int | None:
        """Id of a token (an added token's content or a vocabulary piece); None when unknown."""
        if token in self._added:
            return self._added[token].id
        if self._sp is not None:
            return self._sp.piece_id(token)
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added_by_id:
            return self._added_by_id[token_id].content
        if self._sp is not None:
            return self._sp.id_to_piece(token_id)
        return self._hf.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids (base vocabulary and added tokens): the largest id + 1."""
        if self._sp is not None:
            base = self._sp.base_size
        else:
            base = self._hf.get_vocab_size(with_added_tokens=True)
        return max([base, *(i + 1 for i in self._added_by_id)])

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------------------------------------- encoding

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`. With add_bos, the special tokens the model's config asks for (BOS, when the
        checkpoint has `add_bos_token`, or what tokenizer.json's post-processor adds) are added."""
        if self._sp is not None:
            ids = self._encode_sentencepiece(text)
        elif self.add_bos_token is None and self.add_eos_token is None:
            return self._hf.encode(text, add_special_tokens=add_bos).ids     # tokenizer.json's post-processor
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.add_bos_token and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos_token and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def _split_added(self, text: str) -> list[str | AddedToken]:
        """Text split into plain strings and added tokens (leftmost match, longest first)."""
        parts: list[str | AddedToken] = []
        start = i = 0
        n = len(text)
        while i < n:
            match = None
            for cand in self._split_first.get(text[i], ()):
                if text.startswith(cand, i):
                    match = cand
                    break
            if match is None:
                i += 1
                continue
            if start < i:
                parts.append(text[start:i])
            tok = self._added.get(match) or AddedToken(match, self._split[match])
            parts.append(tok)
            i += len(match)
            start = i
        if start < n:
            parts.append(text[start:])
        # lstrip / rstrip flags strip the whitespace next to the token
        for k, p in enumerate(parts):
            if isinstance(p, AddedToken):
                if p.rstrip and k + 1 < len(parts) and isinstance(parts[k + 1], str):
                    parts[k + 1] = parts[k + 1].lstrip()
                if p.lstrip and k > 0 and isinstance(parts[k - 1], str):
                    parts[k - 1] = parts[k - 1].rstrip()
        return [p for p in parts if not (isinstance(p, str) and p == "")]

    def _encode_sentencepiece(self, text: str) -> list[int]:
        sp = self._sp
        if not text:
            return []
        if not sp.legacy:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if sp.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        ids: list[int] = []
        from_sp: list[bool] = []
        for part in self._split_added(text):
            if isinstance(part, AddedToken):
                ids.append(part.id)
                from_sp.append(False)
            else:
                seg = sp.encode_segment(part)
                ids.extend(seg)
                from_sp.extend([True] * len(seg))
        # non-legacy: the prefix "▁" before a leading special token is dropped (transformers' LlamaTokenizer)
        if (not sp.legacy and len(ids) > 1 and from_sp[0] and ids[0] == sp.underline_id and not from_sp[1]
                and self.id_to_token(ids[1]) in self._named_special):
            ids = ids[1:]
        return ids

    # ---------------------------------------------------------------------------------------------- decoding

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of `ids`. Added tokens are written as their content (or dropped with skip_special_tokens);
        runs of ordinary tokens are decoded by the backend (sentencepiece: its own decoder, byte fallback
        `<0xNN>` pieces turned back into bytes, invalid UTF-8 as U+FFFD). `clean_up_tokenization_spaces`
        None follows the checkpoint (always on for InternLM2Tokenizer, whose decode applied it
        unconditionally; else tokenizer_config's `clean_up_tokenization_spaces`)."""
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        text = self._decode(ids, skip_special_tokens)
        return clean_up_tokenization(text) if clean else text

    def _decode(self, ids, skip_special_tokens: bool) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            tok = self._added_by_id.get(i)
            if tok is None and i >= self._sp.base_size:
                raise ValueError(f"token id {i} out of range (vocab size {self.vocab_size})")
            if tok is not None:
                if run:
                    out.append(self._sp.decode_run(run))
                    run = []
                out.append(tok.content)
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode_run(run))
        return "".join(out)

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: ``feed`` one id at a time and get the new text. Text that ends inside an
    incomplete UTF-8 character (a byte-fallback or byte-level piece still waiting for its continuation bytes)
    is held back until it is complete; ``finish`` returns whatever is left. For output that is valid UTF-8,
    the concatenation of all deltas equals ``tokenizer.decode(all_ids)`` (with invalid byte sequences a
    decoder may replace bytes that were already returned; the stream cannot take them back).

    Decodes a short window (from the start of the previous delta) rather than the whole sequence, as vLLM's
    incremental detokenizer does, so a step costs O(window), not O(sequence). When the checkpoint's decode
    cleans up tokenization spaces (InternLM2Tokenizer), a trailing space, apostrophe, "n", "v" or "r" is held
    back until the next tokens show whether the clean-up changes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.clean_up = tokenizer.clean_up_tokenization_spaces
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self._raw = ""  # decoded text before the clean-up
        self._prefix = 0  # window start
        self._read = 0  # ids up to here are in self._raw

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def feed(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            # wait for the rest of the character; and keep the window where it is while a token adds no text
            # (a skipped special token, or a "▁" that sentencepiece strips at the start of a decode)
            return ""
        if not new_text.startswith(prefix_text):
            # the window's decoding is not additive here: fall back to decoding everything
            full = self._decode(self.ids)
            if full.endswith("\ufffd") or not full.startswith(self._raw):
                return ""
            raw_delta = full[len(self._raw) :]
        else:
            raw_delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._raw += raw_delta
        return self._emit(final=False)

    def _emit(self, final: bool) -> str:
        if not self.clean_up:
            out = self._raw
        else:
            end = len(self._raw)
            while not final and end > 0 and self._raw[end - 1] in _CLEANUP_UNSAFE_END:
                end -= 1
            out = clean_up_tokenization(self._raw[:end])
        if not out.startswith(self.text):
            return ""
        delta = out[len(self.text) :]
        self.text += delta
        return delta

    def finish(self) -> str:
        """Text still held back (an incomplete character at the end is returned as U+FFFD)."""
        full = self._decode(self.ids)
        if full.startswith(self._raw):
            self._raw = full
        self._prefix = self._read = len(self.ids)
        return self._emit(final=True)
