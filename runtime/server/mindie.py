"""MindIE native: `POST /infer` (stream or not) and `POST /v1/tokenizer`.

Parameters as MindIE documents them (TGI 0.9.4 behaviour, max_new_tokens 20 by default);
errors `{"error", "error_type"}` with MindIE's error types ("Input Validation Error" 422, ...).
The stream is SSE with MindIE's records (`token.id` a list, `prefill_time`/`decode_time` in ms)
and no terminator; the last record carries `generated_text` and `details`.
"""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse

from . import tgi
from .protocol import ApiError, GenRequest, check_unknown, require_object, split_parts

ERROR_TYPES = {400: "Bad Request", 403: "Bad Request", 404: "NotFoundError", 413: "Input Validation Error",
               422: "Input Validation Error", 424: "Generation Error", 429: "Service Unavailable",
               500: "Incomplete Generation", 503: "Service Unavailable"}
EXTRA_PARAMS = {"priority", "timeout", "batch_size", "perf_stat"}


def error_body(e: ApiError) -> dict:
    return {"error": e.message, "error_type": ERROR_TYPES.get(e.status, "Input Validation Error")}


def status_of(e: ApiError) -> int:
    return 422 if e.status in (400, 403) and e.kind == "validation" else e.status


def register(app, server):
    engine = server.engine

    @app.post("/infer")
    @server.route("mindie_infer", error_body, status_of)
    async def infer(request: Request, body):
        body = require_object(body)
        check_unknown(body, {"inputs", "stream", "parameters"}, "the request")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(422, "`stream` must be a boolean")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise ApiError(422, "`parameters` must be an object")
        params = {k: v for k, v in params.items() if k not in EXTRA_PARAMS}   # scheduling hints, not used
        sampling, stop, details = tgi.parse_parameters(params, server, stream)
        text, images = tgi.parse_inputs(body.get("inputs"))
        gen = await server.generate(GenRequest(prompt=text, images=images, params=sampling, stop=stop, stream=stream))
        finish = lambda g: tgi.FINISH.get(g.finish_reason, "length")   # noqa: E731
        if not stream:
            await server.collect(gen, request)
            out = {"generated_text": gen.text}
            if details:
                out["details"] = {"finish_reason": finish(gen), "generated_tokens": len(gen.output_ids),
                                  "seed": gen.seq.params.seed}
            return JSONResponse(out)

        async def chunks(gen):
            from .app import sse
            t_prev, held, first = time.perf_counter(), None, True
            async for ev in gen.events():
                now = time.perf_counter()
                if ev.kind == "token":
                    if held is not None:
                        yield sse(held)
                    ms = round(1000 * (now - t_prev), 2)
                    held = {"prefill_time": ms if first else None, "decode_time": None if first else ms,
                            "token": {"id": [ev.token], "text": ev.text}}
                    first, t_prev = False, now
                    continue
                if ev.error:
                    yield sse({"error": ev.error, "error_type": "Incomplete Generation"})
                    return
                held = held or {"prefill_time": None, "decode_time": None, "token": {"id": [], "text": ""}}
                held["token"]["text"] += ev.text
                held["generated_text"] = gen.text
                held["details"] = {"finish_reason": finish(gen), "generated_tokens": len(gen.output_ids),
                                   "seed": gen.seq.params.seed}
                yield sse(held)
        return server.stream(gen, chunks)

    @app.post("/v1/tokenizer")
    @server.route("mindie_tokenizer", error_body, status_of)
    async def tokenizer(request: Request, body):
        body = require_object(body)
        check_unknown(body, {"inputs"}, "the request")
        value = body.get("inputs")
        if value is None or (isinstance(value, str) and not value):
            raise ApiError(422, "`inputs` is required and cannot be empty")
        text, images = split_parts(value, "inputs")
        if images:      # the whole prompt the model would see, image tokens included
            seq = await server.loop.prepare(GenRequest(prompt=text, images=images))
            ids = seq.prompt_ids
        else:
            ids = engine.tokenizer.encode(text, add_bos=False)
        return JSONResponse({"token_number": len(ids), "tokens": ids})
