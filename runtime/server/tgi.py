"""Hugging Face TGI: `POST /generate`, `/generate_stream`, `/` (compat), `GET /info`.

TGI's own types and validation: `token.id` an int, `special` a bool, `details.finish_reason`
in length|eos_token|stop_sequence; errors `{"error", "error_type"}` with 422 validation, 424
generation, 429 overloaded, 500 incomplete_generation. Images come as MindIE part lists in
`inputs` or as markdown `![](data:...)` in the text. Unlike real TGI, the chat template is
applied to `inputs` (as MindIE does for InternVL): the same question gives the same answer as
`internvl-run`.
"""
from __future__ import annotations

from fastapi import Request

from .media import markdown_images
from .protocol import (ApiError, GenRequest, check_bool, check_number, check_unknown, make_params, require_object,
                       split_parts, stop_list)

FINISH = {"stop": "eos_token", "length": "length", "stop_sequence": "stop_sequence", "cancelled": "length",
          "error": "length"}
ERROR_TYPES = {"validation": "validation", "generation": "generation", "overloaded": "overloaded",
               "unavailable": "overloaded"}
PARAMS = {"best_of", "decoder_input_details", "details", "do_sample", "frequency_penalty", "grammar",
          "max_new_tokens", "repetition_penalty", "return_full_text", "seed", "stop", "temperature", "top_k",
          "top_n_tokens", "top_p", "truncate", "typical_p", "watermark", "adapter_id"}
MAX_STOP = 4


def error_body(e: ApiError) -> dict:
    if e.status >= 500:
        kind = "incomplete_generation" if e.kind != "unavailable" else "overloaded"
    else:
        kind = ERROR_TYPES.get(e.kind, "validation")
    msg = e.message if e.status >= 500 or e.message.startswith("Input validation error") else \
        f"Input validation error: {e.message}"
    return {"error": msg, "error_type": kind}


def status_of(e: ApiError) -> int:
    return 422 if 400 <= e.status < 500 and e.status not in (413, 429) else e.status


def parse_parameters(p, server, stream: bool, default_max_new: int = 20):
    """TGI's `parameters` object -> (SamplingParams, stop strings, details flag)."""
    if p is None:
        p = {}
    if not isinstance(p, dict):
        raise ApiError(422, "`parameters` must be an object")
    check_unknown(p, PARAMS, "`parameters`")
    temperature = check_number("temperature", p.get("temperature"), lo=0, lo_open=True)
    top_p = check_number("top_p", p.get("top_p"), lo=0, hi=1, lo_open=True, hi_open=True)
    top_k = check_number("top_k", p.get("top_k"), integer=True, lo=0, lo_open=True)
    typical_p = check_number("typical_p", p.get("typical_p"), lo=0, hi=1, lo_open=True, hi_open=True)
    rep = check_number("repetition_penalty", p.get("repetition_penalty"), lo=0, lo_open=True)
    freq = check_number("frequency_penalty", p.get("frequency_penalty"), lo=-2, hi=2)
    max_new = check_number("max_new_tokens", p.get("max_new_tokens"), integer=True)
    seed = check_number("seed", p.get("seed"), integer=True, lo=0)
    best_of = check_number("best_of", p.get("best_of"), integer=True, lo=1)
    do_sample = check_bool("do_sample", p.get("do_sample"))
    details = bool(check_bool("details", p.get("details")))
    if check_bool("decoder_input_details", p.get("decoder_input_details")) and stream:
        raise ApiError(422, "`decoder_input_details` == true is not supported with streaming tokens")
    if best_of not in (None, 1):
        raise ApiError(422, "`best_of` > 1 is not supported")
    if typical_p is not None or (freq not in (None, 0)) or p.get("grammar") or p.get("top_n_tokens"):
        raise ApiError(422, "typical_p, frequency_penalty, grammar and top_n_tokens are not supported by this server")
    if p.get("watermark"):
        raise ApiError(422, "`watermark` is not supported by this server")
    stop = stop_list(p.get("stop"), max_items=MAX_STOP)
    sample = do_sample is True or (do_sample is None and any(v is not None for v in (temperature, top_k, top_p)))
    params = make_params(max_new_tokens=default_max_new if max_new is None else max_new, max_cap=server.cap,
                         temperature=(temperature if temperature is not None else 1.0) if sample else 0.0,
                         top_p=top_p if (sample and top_p is not None) else 1.0,
                         top_k=top_k if (sample and top_k is not None) else 0,
                         repetition_penalty=rep if rep is not None else 1.0, seed=seed)
    return params, stop, details


def parse_inputs(value) -> tuple[str, list]:
    if value is None:
        raise ApiError(422, "`inputs` is required")
    text, images = split_parts(value, "inputs")
    text, md = markdown_images(text)
    images = images + md
    if not text.strip() and not images:
        raise ApiError(422, "`inputs` cannot be empty")
    return text, images


def _token(tok: int, text: str, special: bool) -> dict:
    return {"id": int(tok), "text": text, "logprob": None, "special": bool(special)}


def register(app, server):
    engine = server.engine

    def build(body: dict, stream: bool) -> tuple[GenRequest, bool]:
        body = require_object(body)
        if "inputs" not in body:
            raise ApiError(422, "`inputs` is required (or `prompt`, for the vLLM format of /generate)")
        check_unknown(body, {"inputs", "parameters", "stream"}, "the request")
        text, images = parse_inputs(body.get("inputs"))
        params, stop, details = parse_parameters(body.get("parameters"), server, stream)
        return GenRequest(prompt=text, images=images, params=params, stop=stop, stream=stream), details

    def details_of(gen, with_tokens: bool) -> dict:
        d = {"finish_reason": FINISH.get(gen.finish_reason, "length"), "generated_tokens": len(gen.output_ids),
             "seed": gen.seq.params.seed}
        if with_tokens:
            d["prefill"] = []
            d["tokens"] = [_token(t, engine.tokenizer.decode([t]), t in engine.stop_ids)
                           for t in gen.output_ids]
        return d

    async def respond(request, body, stream: bool, compat_list: bool):
        req, details = build(body, stream)
        gen = await server.generate(req)
        if not stream:
            await server.collect(gen, request)
            out = {"generated_text": gen.text}
            if details:
                out["details"] = details_of(gen, True)
            from fastapi.responses import JSONResponse
            return JSONResponse([out] if compat_list else out)

        async def chunks(gen):
            from .app import sse
            held, index = None, 0
            async for ev in gen.events():
                if ev.kind == "token":
                    if held is not None:
                        index += 1
                        yield sse({"index": index, "token": held, "generated_text": None, "details": None})
                    held = _token(ev.token, ev.text, ev.special)
                    continue
                if ev.error:
                    yield sse({"error": ev.error, "error_type": "incomplete_generation"})
                    return
                if held is None:
                    held = _token(0, "", True)
                held["text"] += ev.text
                index += 1
                d = details_of(gen, False)
                d["input_length"] = gen.prompt_tokens
                yield sse({"index": index, "token": held, "generated_text": gen.text,
                           "details": d if details else None})
        return server.stream(gen, chunks)

    @server.route("tgi_generate", error_body, status_of)
    async def tgi_generate(request: Request, body):
        return await respond(request, body, stream=False, compat_list=False)

    @app.post("/generate_stream")
    @server.route("tgi_generate_stream", error_body, status_of)
    async def generate_stream(request: Request, body):
        return await respond(request, body, stream=True, compat_list=False)

    @app.post("/")
    @server.route("tgi_compat", error_body, status_of)
    async def compat(request: Request, body):
        stream = isinstance(body, dict) and body.get("stream") is True
        if isinstance(body, dict) and body.get("stream") not in (None, True, False):
            raise ApiError(422, "`stream` must be a boolean")
        return await respond(request, body, stream=stream, compat_list=True)

    @app.get("/info")
    async def info():
        from importlib.metadata import version
        return {"model_id": server.options.model_name, "model_sha": None, "model_dtype": engine.spec.dtype,
                "model_device_type": engine.device.type, "model_pipeline_tag": "image-text-to-text",
                "max_concurrent_requests": 128, "max_best_of": 1, "max_stop_sequences": MAX_STOP,
                "max_input_tokens": server.max_context - 1, "max_total_tokens": server.max_context,
                "validation_workers": 1, "max_client_batch_size": 1, "router": "internvl-serve",
                "version": version("internvl-aot"), "sha": None, "docker_label": None}

    return tgi_generate
