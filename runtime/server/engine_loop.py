"""The async front end over one `Engine`: requests join and leave the same continuous batch.

The engine belongs to one thread, the loop thread, which alone calls `Engine.step()`, adds and
cancels sequences (the scheduler is not thread-safe). HTTP handlers run on the asyncio loop:
`submit()` prepares the sequence (image tiling, templating, tokenizing) in a worker thread,
hands it to the loop thread through an inbox and returns a `Generation`, whose events (each
sampled token, then the end) arrive through `call_soon_threadsafe`. Cancelling a generation
(client gone, stop string seen) is another inbox message: its blocks are freed before the
next step. A step that raises fails the requests in it and the loop goes on; a dead
tensor-parallel group marks the engine dead (health answers 503).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ..engine import Engine, Request, RequestError
from ..sequence import Sequence, Status
from .metrics import Metrics
from .protocol import ApiError, GenRequest


@dataclass
class Event:
    kind: str                      # "token" | "done"
    token: int = -1
    text: str = ""                 # token: its text delta; done: the decoder's last held-back text
    special: bool = False          # a stop token (no text)
    finish_reason: str = ""        # done: "stop" | "length" | "stop_sequence" | "cancelled" | "error"
    error: str = ""


@dataclass
class Generation:
    """One request in flight: its sequence, its event queue and the text so far."""
    seq: Sequence
    request: GenRequest
    loop: "EngineLoop"
    decoder: object = None            # the tokenizer's StreamDecoder for this request's text
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""
    t_first: Optional[float] = None
    t_last: Optional[float] = None
    done: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.seq.prompt_ids)

    async def events(self):
        """Token events with text deltas (a stop token comes with no text, `special`; text after a
        stop string is left out), then one "done" event with any text the decoder held back."""
        while True:
            ev = await self.queue.get()
            yield ev
            if ev.kind == "done":
                return

    async def result(self) -> "Generation":
        async for _ in self.events():
            pass
        return self

    def cancel(self) -> None:
        if not self.done:
            self.loop.cancel(self)


class EngineLoop:
    def __init__(self, engine: Engine, metrics: Metrics | None = None, media=None):
        self.engine, self.metrics, self.media = engine, metrics or Metrics(), media
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._gens: dict[int, Generation] = {}
        self._stopping = False
        self.dead: str = ""
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._aio: asyncio.AbstractEventLoop | None = None

    # -- asyncio side --------------------------------------------------------------------------
    def start(self) -> None:
        self._aio = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    async def submit(self, req: GenRequest) -> Generation:
        if self.dead:
            raise ApiError(503, f"the engine is down: {self.dead}", kind="unavailable")
        loop = asyncio.get_running_loop()
        seq = await loop.run_in_executor(None, self._prepare, req)
        gen = Generation(seq=seq, request=req, loop=self,
                         decoder=self.engine.tokenizer.stream(skip_special_tokens=True))
        seq.on_token = lambda s, tok, g=gen: self._on_token(g, tok)
        self._inbox.put(("add", gen))
        self._wake.set()
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        return gen

    async def prepare(self, req: GenRequest) -> Sequence:
        """The sequence a request becomes (images checked, prompt built and tokenized), not queued."""
        return await asyncio.get_running_loop().run_in_executor(None, self._prepare, req)

    def _prepare(self, req: GenRequest) -> Sequence:
        images = self.media.load_all(req.images) if (self.media and req.images) else list(req.images)
        try:
            return self.engine.make_sequence(Request(prompt=req.prompt, images=images, system=req.system,
                                                     history=req.history, raw_prompt=req.raw_prompt,
                                                     max_tiles=req.max_tiles, params=req.params))
        except RequestError as e:
            raise ApiError(422, str(e)) from None

    def cancel(self, gen: Generation, reason: str = "cancelled") -> None:
        self._inbox.put(("cancel", gen, reason))
        self._wake.set()

    def state(self) -> dict:
        s = self.engine.scheduler
        return {"waiting": len(s.waiting), "prefilling": len(s.prefilling), "running": len(s.running),
                "blocks_free": self.engine.allocator.num_free_blocks,
                "blocks_total": self.engine.allocator.num_blocks - 1}

    # -- loop thread ---------------------------------------------------------------------------
    def _emit(self, gen: Generation, ev: Event) -> None:
        self._aio.call_soon_threadsafe(gen.queue.put_nowait, ev)

    def _on_token(self, gen: Generation, tok: int) -> None:
        now = time.perf_counter()
        if gen.t_first is None:
            gen.t_first = now
            self.metrics.ttft.observe(now - gen.seq.t_arrival)
        else:
            self.metrics.token_latency.observe(now - gen.t_last)
        gen.t_last = now
        self.metrics.generation_tokens.inc()
        gen.output_ids.append(tok)
        if self.engine.is_stop_token(gen.seq, tok):
            self._emit(gen, Event("token", tok, "", special=True))
            return
        delta = gen.decoder.feed(tok)
        if gen.request.stop:
            delta = self._cut_at_stop(gen, delta)
        gen.text += delta
        self._emit(gen, Event("token", tok, delta))

    def _cut_at_stop(self, gen: Generation, delta: str) -> str:
        """Text up to a stop string, which is not sent; the sequence then ends as stop_sequence."""
        if gen.finish_reason:
            return ""
        text = gen.text + delta
        cut = min((i for i in (text.find(s, max(0, len(gen.text) - len(s))) for s in gen.request.stop) if i >= 0),
                  default=-1)
        if cut < 0:
            return delta
        gen.finish_reason = "stop_sequence"
        self.engine.scheduler.cancel(gen.seq)
        return text[:cut][len(gen.text):]

    def _finish(self, gen: Generation) -> None:
        seq = gen.seq
        if not gen.finish_reason:
            gen.finish_reason = seq.finish_reason or "error"
        tail = ""
        if gen.finish_reason != "stop_sequence" and not gen.error:
            tail = gen.decoder.finish()
            gen.text += tail
        gen.done = True
        self._gens.pop(seq.seq_id, None)
        self.metrics.finished.labels(reason=gen.finish_reason).inc()
        self._emit(gen, Event("done", text=tail, finish_reason=gen.finish_reason, error=gen.error))

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            gen = msg[1]
            if msg[0] == "add":
                if self.dead:
                    gen.error, gen.finish_reason = self.dead, "error"
                    self._finish(gen)
                    continue
                self._gens[gen.seq.seq_id] = gen
                self.engine.scheduler.add(gen.seq)
            elif gen.seq.status is not Status.FINISHED:
                self.engine.scheduler.cancel(gen.seq)
                gen.finish_reason = gen.finish_reason or msg[2]

    def _run(self) -> None:
        try:
            from ..tp import TPError
        except ImportError:         # no torch (the numpy engine of an ONNX artifact): no TP groups either
            class TPError(Exception):      # never raised without torch
                pass
        with self.engine._inference():
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.scheduler.has_work():
                    self._sweep()
                    self._update_gauges()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                try:
                    rec = self.engine.step()
                    if rec is not None and rec.kind == "decode":
                        self.metrics.decode_step.observe(rec.seconds)
                except TPError as e:
                    self.dead = str(e)
                    self._fail_all(str(e))
                except Exception as e:      # noqa: BLE001 - one failing step must not stop the server
                    self._fail_running(f"{type(e).__name__}: {e}")
                self._sweep()
                self._update_gauges()

    def _sweep(self) -> None:
        for gen in [g for g in self._gens.values() if g.seq.status is Status.FINISHED]:
            self._finish(gen)

    def _fail_running(self, message: str) -> None:
        s = self.engine.scheduler
        for seq in list(s.prefilling) + list(s.running):
            gen = self._gens.get(seq.seq_id)
            s.cancel(seq)
            if gen is not None:
                gen.error, gen.finish_reason = message, "error"

    def _fail_all(self, message: str) -> None:
        s = self.engine.scheduler
        for seq in list(s.waiting) + list(s.prefilling) + list(s.running):
            s.cancel(seq)
        for gen in self._gens.values():
            gen.error, gen.finish_reason = message, "error"

    def _update_gauges(self) -> None:
        st = self.state()
        m = self.metrics
        m.running.set(st["running"] + st["prefilling"])
        m.waiting.set(st["waiting"])
        m.preempted.set(self.engine.scheduler.num_preemptions)
        m.blocks_free.set(st["blocks_free"])
        m.blocks_used.set(st["blocks_total"] - st["blocks_free"])
