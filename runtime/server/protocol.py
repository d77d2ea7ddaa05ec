"""The one internal request all five formats translate to, and what they share.

A format module parses its own JSON into a `GenRequest` (text or part list, images, sampling
parameters, stream flag) and renders the engine's `Generation` back into its own reply. Input
problems raise `ApiError` with a status and a message; each format renders it in its own shape.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from ..sampler import SamplingParams


class ApiError(Exception):
    """A request that cannot be served; `kind` is the format-neutral class of the problem:
    validation (4xx, bad input), overloaded (429), generation (the model failed on this request)."""

    def __init__(self, status: int, message: str, kind: str = "validation", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class GenRequest:
    """What every route hands the engine loop."""
    prompt: str = ""
    images: list = field(default_factory=list)       # raw image references, resolved by media.py
    system: Optional[str] = None
    history: list = field(default_factory=list)       # [(user, assistant)]
    raw_prompt: bool = False
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)     # stop strings (text-level)
    stream: bool = False
    max_tiles: Optional[int] = None


def parse_json(body: bytes) -> Any:
    if not body:
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def split_parts(value: Any, field_name: str) -> tuple[str, list]:
    """A MindIE text field: a string, or a list of parts `{"type": "text", "text": ...}` and
    `{"type": "image_url", "image_url": "<str>" | {"url": "<str>"}}`. Returns (text, image refs)."""
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list):
        raise ApiError(422, f"`{field_name}` must be a string or a list of parts, got {type(value).__name__}",
                       param=field_name)
    texts, images = [], []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ApiError(422, f"`{field_name}[{i}]` must be an object with a string `type`", param=field_name)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(422, f"`{field_name}[{i}].text` must be a string", param=field_name)
            texts.append(part["text"])
        elif kind in ("image_url", "input_image"):
            ref = part.get(kind)
            if isinstance(ref, dict):
                ref = ref.get("url")
            if not isinstance(ref, str) or not ref:
                raise ApiError(422, f"`{field_name}[{i}].{kind}` must be a non-empty string or an object "
                                    f"with a string `url` (request param image_url null)", param=field_name)
            images.append(ref)
        elif kind in ("video_url", "audio_url", "input_audio"):
            raise ApiError(422, f"`{field_name}[{i}]`: {kind} is not supported by InternVL here (images only)",
                           param=field_name)
        else:
            raise ApiError(422, f"`{field_name}[{i}]`: unknown part type {kind!r} (text or image_url)",
                           param=field_name)
    return "\n".join(texts), images


def stop_list(value: Any, name: str = "stop", max_items: int = 16) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ApiError(422, f"`{name}` must be a non-empty string or a list of non-empty strings", param=name)
    if len(value) > max_items:
        raise ApiError(422, f"`{name}` has {len(value)} entries; at most {max_items} are allowed", param=name)
    return list(value)


def check_number(name: str, value: Any, *, integer: bool = False, lo=None, hi=None,
                 lo_open: bool = False, hi_open: bool = False) -> Any:
    """Type and range check of one sampling field; None passes through (absent)."""
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ApiError(422, f"`{name}` must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}",
                       param=name)
    bad = ((lo is not None and (value <= lo if lo_open else value < lo))
           or (hi is not None and (value >= hi if hi_open else value > hi)))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ApiError(422, f"`{name}` must be in {left}{'-inf' if lo is None else lo}, "
                            f"{'inf' if hi is None else hi}{right}, got {value}", param=name)
    return value


def check_bool(name: str, value: Any) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise ApiError(422, f"`{name}` must be a boolean, got {json.dumps(value)}", param=name)
    return value


def check_unknown(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ApiError(422, f"unknown field(s) in {where}: {', '.join(unknown)}")


def make_params(*, max_new_tokens: int, max_cap: int, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                ignore_eos: bool = False, stop_token_ids=(), stop_at_eos: bool = False) -> SamplingParams:
    if max_new_tokens < 1:
        raise ApiError(422, f"the number of new tokens must be >= 1, got {max_new_tokens}", param="max_new_tokens")
    if max_new_tokens > max_cap:
        raise ApiError(422, f"the number of new tokens must be <= {max_cap} (the server's cap), got "
                            f"{max_new_tokens}", param="max_new_tokens")
    try:
        return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                              repetition_penalty=float(repetition_penalty), seed=seed,
                              max_new_tokens=int(max_new_tokens), ignore_eos=ignore_eos,
                              stop_token_ids=tuple(stop_token_ids), stop_at_eos=stop_at_eos)
    except ValueError as e:
        raise ApiError(422, str(e)) from None
