"""vLLM's generate API (`vllm/entrypoints/api_server.py`, as MindIE serves it): `POST /generate`
with `prompt` (told apart from TGI by that key), sampling parameters at the top level.

Reply `{"text": [prompt + output]}` (vLLM and MindIE both return the prompt text in front).
Stream: not SSE but JSON records `{"text": ["<delta>"]}`, each followed by a delimiter: `\\0` by
default as MindIE does (clients read them with `iter_lines(delimiter=b"\\0")`), `\\n` as current
vLLM with `--vllm-stream-delimiter newline`. Records are per-token deltas (MindIE), not vLLM's
cumulative text. Errors `{"error", "error_type"}` (vLLM's legacy server has no error shape of its
own; an unknown parameter is a 422 here where vLLM answers 500).
"""
from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from .protocol import (ApiError, GenRequest, check_bool, check_number, check_unknown, make_params, require_object,
                       split_parts, stop_list)

KNOWN = {"prompt", "stream", "n", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
         "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "model",
         "include_stop_str_in_output", "skip_special_tokens", "do_sample", "min_tokens", "logprobs", "stop_at_eos"}


def error_body(e: ApiError) -> dict:
    return {"error": e.message, "error_type": "validation" if e.status < 500 else "generation"}


def parse(body: dict, server) -> GenRequest:
    body = require_object(body)
    check_unknown(body, KNOWN, "the request (vLLM sampling parameters)")
    text, images = split_parts(body.get("prompt"), "prompt")
    if not text.strip() and not images:
        raise ApiError(422, "`prompt` cannot be empty")
    stream = check_bool("stream", body.get("stream")) or False
    if check_number("n", body.get("n"), integer=True) not in (None, 1):
        raise ApiError(422, "`n` > 1 is not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if check_number(name, body.get(name), lo=-2, hi=2) not in (None, 0):
            raise ApiError(422, f"`{name}` is not supported by this server (only 0)")
    if body.get("logprobs") is not None or body.get("min_tokens") not in (None, 0):
        raise ApiError(422, "`logprobs` and `min_tokens` are not supported by this server")
    if body.get("include_stop_str_in_output") or body.get("skip_special_tokens") is False:
        raise ApiError(422, "include_stop_str_in_output=true and skip_special_tokens=false are not supported")
    temperature = check_number("temperature", body.get("temperature"), lo=0)
    do_sample = check_bool("do_sample", body.get("do_sample"))
    if do_sample is False:
        temperature = 0.0
    top_k = check_number("top_k", body.get("top_k"), integer=True, lo=-1)
    if top_k is not None and top_k < 0:
        top_k = 0
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ApiError(422, "`stop_token_ids` must be a list of integers")
    max_tokens = check_number("max_tokens", body.get("max_tokens"), integer=True)
    params = make_params(
        max_new_tokens=16 if max_tokens is None else max_tokens, max_cap=server.cap,
        temperature=1.0 if temperature is None else temperature,
        top_p=check_number("top_p", body.get("top_p"), lo=0, hi=1, lo_open=True) or 1.0,
        top_k=top_k or 0, repetition_penalty=check_number("repetition_penalty", body.get("repetition_penalty"),
                                                          lo=0, hi=2, lo_open=True) or 1.0,
        seed=check_number("seed", body.get("seed"), integer=True), ignore_eos=bool(check_bool(
            "ignore_eos", body.get("ignore_eos"))), stop_token_ids=ids,
        stop_at_eos=bool(check_bool("stop_at_eos", body.get("stop_at_eos"))))
    return GenRequest(prompt=text, images=images, params=params, stop=stop_list(body.get("stop")), stream=stream)


def register(app, server):
    delim = server.options.vllm_delimiter.encode()

    @server.route("vllm_generate", error_body)
    async def vllm_generate(request: Request, body):
        req = parse(body, server)
        gen = await server.generate(req)
        if not req.stream:
            await server.collect(gen, request)
            return JSONResponse({"text": [req.prompt + gen.text]})

        async def chunks(gen):
            async for ev in gen.events():
                if ev.kind == "done" and ev.error:
                    yield json.dumps({"error": ev.error}).encode() + delim
                    return
                if ev.text:
                    yield json.dumps({"text": [ev.text]}, ensure_ascii=False).encode() + delim
        return server.stream(gen, chunks, media_type="application/json")

    return vllm_generate
