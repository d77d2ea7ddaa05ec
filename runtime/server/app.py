"""The FastAPI application: one `EngineLoop`, the routes of every format, health and metrics.

Each format module exposes `register(app, server)`; the shared plumbing is here: parsing a body
under the route's own error shape (`Server.route`), waiting for a result while watching for a
client that went away, streaming with cancellation, the body-size limit, and request counting.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import Engine
from .engine_loop import EngineLoop, Generation
from .media import MediaPolicy
from .metrics import Metrics
from .protocol import ApiError, GenRequest, parse_json

ErrorShape = Callable[[ApiError], dict]


@dataclass
class ServerOptions:
    model_name: str = "internvl"
    max_new_tokens_cap: int | None = None        # None: the artifact's largest context
    max_body_mb: float = 40.0
    vllm_delimiter: str = "\0"                   # MindIE's; current vLLM uses "\n"
    media: MediaPolicy = field(default_factory=MediaPolicy)


class Server:
    def __init__(self, engine: Engine, options: ServerOptions):
        self.engine, self.options = engine, options
        self.metrics = Metrics()
        self.loop = EngineLoop(engine, self.metrics, options.media)
        self.max_context = engine.runner.max_context
        self.cap = options.max_new_tokens_cap or self.max_context
        self.started = time.time()

    # -- handlers -------------------------------------------------------------------------------
    def route(self, name: str, shape: ErrorShape, status_of: Callable[[ApiError], int] | None = None):
        """Decorator: the handler gets (request, parsed JSON body or None); any ApiError becomes
        the route's own error body; anything else a 500 of that shape with x-should-retry: false."""
        def wrap(fn: Callable[..., Awaitable[Response]]):
            async def handler(request: Request, **path):
                try:
                    body = await json_body(request) if request.method == "POST" else None
                    resp = await fn(request, body, **path)
                except ApiError as e:
                    status = status_of(e) if status_of else e.status
                    # a retry of a request the engine failed on, or of bad input, cannot help
                    headers = {"x-should-retry": "false"} if status >= 500 and e.kind != "unavailable" else None
                    resp = JSONResponse(shape(e), status_code=status, headers=headers)
                except Exception as e:      # noqa: BLE001 - one request's failure, not the server's
                    err = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="generation")
                    resp = JSONResponse(shape(err), status_code=500, headers={"x-should-retry": "false"})
                self.metrics.requests.labels(route=name, status=str(resp.status_code)).inc()
                return resp
            handler.__name__ = fn.__name__
            # FastAPI reads the signature: the request plus fn's path parameters (after `body`).
            params = list(inspect.signature(fn).parameters.values())[2:]
            handler.__signature__ = inspect.Signature(
                [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
                + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
            return handler
        return wrap

    async def generate(self, req: GenRequest) -> Generation:
        return await self.loop.submit(req)

    async def collect(self, gen: Generation, request: Request) -> Generation:
        """Wait for the end of a non-streamed generation; a client that disconnects cancels it."""
        task = asyncio.ensure_future(gen.result())
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                break
            if await request.is_disconnected():
                gen.cancel()
        task.result()
        if gen.error:
            raise ApiError(500, gen.error, kind="generation")
        return gen

    def stream(self, gen: Generation, chunks: Callable[[Generation], AsyncIterator[bytes]],
               media_type: str = "text/event-stream") -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks(gen):
                    yield chunk
            finally:                    # the client went away (or we are done): free the blocks
                gen.cancel()
        return StreamingResponse(body(), media_type=media_type,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def json_body(request: Request) -> Any:
    """The request's JSON body, parsed once (the /generate dispatch and the handler both read it)."""
    if not hasattr(request.state, "json_body"):
        request.state.json_body = parse_json(await request.body())
    return request.state.json_body


def sse(obj: Any, space: bool = True) -> bytes:
    return (("data: " if space else "data:") + json.dumps(obj, ensure_ascii=False) + "\n\n").encode()


class BodyLimit:
    """ASGI middleware: a body over the limit gets 413 before the handler reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": f"request body over the {self.max_bytes}-byte limit (--max-body-mb)",
                           "error_type": "validation"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(engine: Engine, options: ServerOptions | None = None) -> FastAPI:
    from contextlib import asynccontextmanager

    from . import mindie, openai, tgi, triton, vllm

    options = options or ServerOptions()
    server = Server(engine, options)

    @asynccontextmanager
    async def lifespan(app):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="internvl-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.get("/health")
    async def health():
        return Response(status_code=503 if server.loop.dead else 200)

    @app.get("/metrics")
    async def metrics():
        server.loop._update_gauges()
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    # /generate is shared by TGI (`inputs`) and vLLM (`prompt`), told apart by the body as MindIE does.
    tgi_generate = tgi.register(app, server)
    vllm_generate = vllm.register(app, server)

    @app.post("/generate")
    async def generate(request: Request):
        try:
            body = await json_body(request)
        except ApiError:
            body = None              # TGI's handler answers it, in TGI's error shape
        if isinstance(body, dict) and "prompt" in body:
            return await vllm_generate(request)
        return await tgi_generate(request)

    mindie.register(app, server)
    triton.register(app, server)
    openai.register(app, server)
    app.add_middleware(BodyLimit, max_bytes=int(options.max_body_mb * (1 << 20)))
    return app
