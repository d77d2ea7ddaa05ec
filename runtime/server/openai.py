"""OpenAI: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

What openai-python and huggingface_hub's `chat_completion` need: any `model` name, `max_tokens`
or `max_completion_tokens`, SSE chunks ending with `data: [DONE]`, `stream_options.include_usage`
(one more chunk with `choices: []` and the usage), errors `{"error": {"message", "type", "param",
"code"}}`. Chat messages go through the artifact's chat template (system message, earlier turns as
history, images from `image_url` parts); `/v1/completions` takes `prompt` as raw text (no
template), text only. Defaults follow OpenAI (temperature 1; max tokens up to the context).
Fields that change nothing here (`user`, `logit_bias` when empty, ...) are accepted and ignored,
as vLLM does; those that would change the output and are not implemented are refused.
"""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from .protocol import (ApiError, GenRequest, check_bool, check_number, make_params, require_object, split_parts,
                       stop_list)

FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "stop", "error": "stop"}
# Fields this server does not implement, with the values that ask for nothing (accepted); any other value is refused.
UNSUPPORTED_IF_SET = {"tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
                      "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "audio": (None,),
                      "prediction": (None,), "top_logprobs": (None, 0)}


def error_body(e: ApiError) -> dict:
    kind = "invalid_request_error" if e.status < 500 else ("service_unavailable" if e.status == 503
                                                            else "internal_error")
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": status_of(e)}}


def status_of(e: ApiError) -> int:
    return 400 if e.status == 422 else e.status


def _sampling(body: dict, server, default_max: int):
    for name, harmless in UNSUPPORTED_IF_SET.items():
        if body.get(name) not in harmless:
            raise ApiError(400, f"`{name}` is not supported by this server", param=name)
    if check_number("n", body.get("n"), integer=True) not in (None, 1):
        raise ApiError(400, "`n` > 1 is not supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if check_number(name, body.get(name), lo=-2, hi=2) not in (None, 0):
            raise ApiError(400, f"`{name}` is not supported by this server (only 0)", param=name)
    if body.get("logprobs"):
        raise ApiError(400, "`logprobs` is not supported by this server", param="logprobs")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    mt = check_number("max_tokens", mt, integer=True)
    top_k = check_number("top_k", body.get("top_k"), integer=True, lo=-1)
    return make_params(
        max_new_tokens=default_max if mt is None else mt, max_cap=server.cap,
        temperature=1.0 if body.get("temperature") is None else check_number("temperature", body["temperature"],
                                                                                lo=0, hi=2),
        top_p=1.0 if body.get("top_p") is None else check_number("top_p", body["top_p"], lo=0, hi=1, lo_open=True),
        top_k=max(top_k or 0, 0),
        repetition_penalty=check_number("repetition_penalty", body.get("repetition_penalty"), lo=0, lo_open=True)
        or 1.0, seed=check_number("seed", body.get("seed"), integer=True),
        ignore_eos=bool(check_bool("ignore_eos", body.get("ignore_eos"))),
        stop_at_eos=bool(check_bool("stop_at_eos", body.get("stop_at_eos"))))


def _messages(messages) -> tuple[str, list, str | None, list]:
    """-> (question, images in order, system or None, history [(user, assistant)])."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    system, turns, images, pending = None, [], [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"`messages[{i}]` must be an object with role system, user or assistant",
                           param="messages")
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""
        text, imgs = split_parts(content, f"messages[{i}].content")
        if m["role"] in ("system", "developer"):
            if imgs:
                raise ApiError(400, "a system message cannot hold images", param="messages")
            system = text if system is None else system + "\n" + text
        elif m["role"] == "user":
            if pending is not None:         # two user turns in a row: one turn
                text = pending[0] + "\n" + text
                imgs = pending[1] + imgs
            pending = (text, imgs)
        else:
            if pending is None:
                raise ApiError(400, f"`messages[{i}]`: an assistant turn must follow a user turn", param="messages")
            turns.append((pending, text))
            pending = None
    if pending is None:
        raise ApiError(400, "the last message must come from the user", param="messages")
    history = []
    n_before = sum(len(u[1]) for u, _ in turns)
    for (text, imgs), answer in turns:
        images += imgs
        history.append(("<image>\n" * len(imgs) + text if imgs and "<image>" not in text else text, answer))
    question, imgs = pending
    images += imgs
    if n_before and imgs and "<image>" not in question:
        question = "<image>\n" * len(imgs) + question
    if not question.strip() and not images:
        raise ApiError(400, "the last user message is empty", param="messages")
    return question, images, system, history


def _usage(gen) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.output_ids),
            "total_tokens": gen.prompt_tokens + len(gen.output_ids)}


def register(app, server):
    model_default = server.options.model_name

    def parse_stream(body) -> tuple[bool, bool]:
        stream = bool(check_bool("stream", body.get("stream")))
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise ApiError(400, "`stream_options` must be an object", param="stream_options")
        usage = bool(opts and opts.get("include_usage", True))
        return stream, usage

    async def run(request, body, chat: bool):
        body = require_object(body)
        model = body.get("model") or model_default
        if not isinstance(model, str):
            raise ApiError(400, "`model` must be a string", param="model")
        if chat:
            question, images, system, history = _messages(body.get("messages"))
            req = GenRequest(prompt=question, images=images, system=system, history=history)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "`prompt` must be a non-empty string (one prompt per request)", param="prompt")
            req = GenRequest(prompt=prompt, raw_prompt=True)
        stream, include_usage = parse_stream(body)
        req.stop, req.stream = stop_list(body.get("stop")), stream
        req.params = _sampling(body, server, default_max=server.cap)
        gen = await server.generate(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not stream:
            await server.collect(gen, request)
            choice = {"index": 0, "logprobs": None, "finish_reason": FINISH.get(gen.finish_reason, "stop")}
            if chat:
                choice["message"] = {"role": "assistant", "content": gen.text}
            else:
                choice["text"] = gen.text
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model,
                                 "system_fingerprint": None, "choices": [choice], "usage": _usage(gen)})

        def chunk(delta=None, finish=None, text=None):
            c = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                c["delta"] = delta if delta is not None else {}
            else:
                c["text"] = text or ""
            out = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model,
                   "choices": [c]}
            if include_usage:
                out["usage"] = None
            return out

        async def chunks(gen):
            from .app import sse
            if chat:
                yield sse(chunk({"role": "assistant", "content": ""}))
            async for ev in gen.events():
                if ev.kind == "done" and ev.error:
                    yield sse({"error": {"message": ev.error, "type": "internal_error", "code": 500}})
                    break
                if ev.text:
                    yield sse(chunk({"content": ev.text}, text=ev.text))
                if ev.kind == "done":
                    yield sse(chunk({}, FINISH.get(gen.finish_reason, "stop")))
                    if include_usage:
                        yield sse({"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                                   "model": model, "choices": [], "usage": _usage(gen)})
            yield b"data: [DONE]\n\n"
        return server.stream(gen, chunks)

    @app.post("/v1/chat/completions")
    @server.route("openai_chat", error_body, status_of)
    async def chat_completions(request: Request, body):
        return await run(request, body, chat=True)

    @app.post("/v1/completions")
    @server.route("openai_completions", error_body, status_of)
    async def completions(request: Request, body):
        return await run(request, body, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_default, "object": "model", "created": int(server.started),
                                            "owned_by": "internvl-aot", "root": model_default, "parent": None,
                                            "max_model_len": server.max_context}]}
