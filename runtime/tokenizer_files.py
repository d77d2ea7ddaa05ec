"""What a checkpoint's tokenizer files say: added and special tokens (tokenizer_config.json,
added_tokens.json, special_tokens_map.json) and the clean-up rule of decoding."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


SPIECE_UNDERLINE = "\u2581"



_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False


# transformers' `clean_up_tokenization`: InternLM2Tokenizer.convert_tokens_to_string applies it on every decode
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# Characters that are a non-final part of some clean-up pattern. The clean-up only deletes spaces, so when the
# text is cut just after any other character, no pattern can span the cut in any replacement step and
# clean(a + b) == clean(a) + clean(b): a stream can return clean(text up to there) and never take it back.
_CLEANUP_UNSAFE_END = frozenset(" 'nvr")


def clean_up_tokenization(text: str) -> str:
    """Removes the space before punctuation and English contractions, exactly as transformers does."""
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


# --------------------------------------------------------------------------------------------------------------
# checkpoint configuration


def _token_content(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class _Config:
    tokenizer_config: dict
    special_tokens_map: dict
    added: dict[int, AddedToken]  # id -> token, from added_tokens_decoder and added_tokens.json
    named: dict[str, str]  # "bos_token" -> "<s>"
    additional_special: list[str]

    @classmethod
    def load(cls, d: Path) -> "_Config":
        tc = _read_json(d / "tokenizer_config.json")
        stm = _read_json(d / "special_tokens_map.json")
        added: dict[int, AddedToken] = {}
        for sid, spec in (tc.get("added_tokens_decoder") or {}).items():
            added[int(sid)] = AddedToken(
                content=spec["content"],
                id=int(sid),
                special=bool(spec.get("special", False)),
                lstrip=bool(spec.get("lstrip", False)),
                rstrip=bool(spec.get("rstrip", False)),
                normalized=bool(spec.get("normalized", not spec.get("special", False))),
            )
        named: dict[str, str] = {}
        for key in _NAMED_SPECIAL:
            content = _token_content(tc.get(key)) or _token_content(stm.get(key))
            if content is not None:
                named[key] = content
        # transformers 5.x writes `extra_special_tokens` where 4.x wrote `additional_special_tokens`
        extra = (tc.get("additional_special_tokens") or tc.get("extra_special_tokens")
                 or stm.get("additional_special_tokens") or [])
        if isinstance(extra, dict):
            extra = list(extra.values())
        additional = [_token_content(t) for t in extra]
        specials = set(named.values()) | set(additional)
        known = {t.content for t in added.values()}
        for content, tid in _read_json(d / "added_tokens.json").items():
            if content not in known:
                special = content in specials
                added[int(tid)] = AddedToken(content, int(tid), special=special, normalized=not special)
        return cls(tc, stm, added, named, additional)
