"""NVIDIA Triton's generate extension (as TensorRT-LLM and MindIE serve it) and KServe v2 health.

`POST /v2/models/{name}/generate` and `/generate_stream`: `text_input` (a string or a MindIE part
list), sampling keys in `parameters` (MindIE) or at the top level (TensorRT-LLM clients:
`max_tokens`, `temperature`, ...); reply `{"model_name", "model_version", "text_output"}`; the
stream is SSE with no terminator, one record per token; errors `{"error": "..."}` (400).
`GET /v2/health/live`, `/v2/health/ready`, `/v2/models/{name}/ready`: 200 with an empty body;
`GET /v2`, `/v2/models/{name}`: metadata. Any model name is accepted (the server has one model).
"""
from __future__ import annotations

import re

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from . import tgi
from .protocol import ApiError, GenRequest, check_unknown, require_object, stop_list

TOP_LEVEL = {"max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
             "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty", "seed": "seed",
             "random_seed": "seed"}
IGNORED = {"bad_words", "pad_id", "end_id", "stream", "id", "text_input", "parameters", "stop_words",
           "return_log_probs", "beam_width", "exclude_input_in_output"}
PARAM_EXTRA = {"batch_size", "perf_stat", "priority", "timeout", "stream"}


def error_body(e: ApiError) -> dict:
    return {"error": e.message}


def status_of(e: ApiError) -> int:
    return 400 if 400 <= e.status < 500 and e.status not in (413, 429) else e.status


def parse(body, server, stream: bool) -> tuple[GenRequest, dict, str | None]:
    body = require_object(body)
    check_unknown(body, set(TOP_LEVEL) | IGNORED, "the request")
    rid = body.get("id")
    if rid is not None and (not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", rid)):
        raise ApiError(400, "`id` must be 1-256 characters of [A-Za-z0-9_-]")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "`parameters` must be an object")
    params = {k: v for k, v in params.items() if k not in PARAM_EXTRA}
    for key, name in TOP_LEVEL.items():
        if key in body:
            params.setdefault(name, body[key])
    if any(k in body for k in ("temperature", "top_p", "top_k")) and "do_sample" not in params:
        params["do_sample"] = params.get("temperature", 1.0) != 0
    if params.get("top_p") == 1:
        params.pop("top_p")              # 1.0 means "off" here; TGI's checks want it left out
    if params.get("top_k") == 0:
        params.pop("top_k")
    if params.get("temperature") == 0:
        params.pop("temperature")
        params["do_sample"] = False
    stop = stop_list(body.get("stop_words") or None, "stop_words")
    sampling, stop2, details = tgi.parse_parameters(params, server, stream)
    text, images = tgi.parse_inputs(body.get("text_input"))
    return (GenRequest(prompt=text, images=images, params=sampling, stop=stop + stop2, stream=stream),
            {"details": details}, rid)


def register(app, server):
    def head(name: str, rid) -> dict:
        out = {"model_name": name, "model_version": "1"}
        if rid is not None:
            out["id"] = rid
        return out

    @app.post("/v2/models/{name}/generate")
    @server.route("triton_generate", error_body, status_of)
    async def generate(request: Request, body, name: str):
        req, _, rid = parse(body, server, stream=False)
        gen = await server.collect(await server.generate(req), request)
        return JSONResponse({**head(name, rid), "text_output": gen.text,
                             "details": {"finish_reason": tgi.FINISH.get(gen.finish_reason, "length"),
                                         "generated_tokens": len(gen.output_ids)}})

    @app.post("/v2/models/{name}/generate_stream")
    @server.route("triton_generate_stream", error_body, status_of)
    async def generate_stream(request: Request, body, name: str):
        req, _, rid = parse(body, server, stream=True)
        gen = await server.generate(req)

        async def chunks(gen):
            from .app import sse
            n = 0
            async for ev in gen.events():
                if ev.kind == "token":
                    n += 1
                    if ev.text:
                        yield sse({**head(name, rid), "text_output": ev.text})
                    continue
                if ev.error:
                    yield sse({"error": ev.error})
                    return
                yield sse({**head(name, rid), "text_output": ev.text,
                           "details": {"finish_reason": tgi.FINISH.get(gen.finish_reason, "length"),
                                       "generated_tokens": n}})
        return server.stream(gen, chunks)

    def ready() -> Response:
        return Response(status_code=503 if server.loop.dead else 200)

    app.get("/v2/health/live")(lambda: Response(status_code=200))
    app.get("/v2/health/ready")(ready)
    app.get("/v2/models/{name}/ready")(lambda name: ready())
    app.get("/v2/models/{name}/versions/{version}/ready")(lambda name, version: ready())

    @app.get("/v2")
    async def server_metadata():
        from importlib.metadata import version
        return {"name": "internvl-serve", "version": version("internvl-aot"), "extensions": ["generate"]}

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        return {"name": name, "versions": ["1"], "platform": "internvl-aot",
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]}
