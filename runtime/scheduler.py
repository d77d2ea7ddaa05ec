"""Continuous batching, planned one step at a time: the scheduler plans, the engine executes.

`schedule()` looks only at the sequences and the block allocator and returns the next piece of
work (`Work`): one vision chunk or one prefill chunk of one sequence, or one decode step for
every running sequence. The engine runs it through the model runner and hands back what came
out (`vision_done`, `prefill_done`, `tokens_sampled`); every change of a sequence's state and
every block allocation happens here.

Sequences move waiting -> prefilling (blocks allocated for the whole prompt; vision chunks,
then prefill chunks) -> running (one token per decode step) -> finished. When the pool runs
out of blocks mid-decode, the most recently admitted sequence is preempted (its blocks freed,
its tokens kept) and prefilled again later: recompute preemption, as vLLM does.

Interleaving: with `prefill_chunks_per_decode=None` (offline use) all waiting prefill work runs
before the next decode step, which minimises time to first token; with an integer k (the
server uses 1), at most k vision/prefill chunks run between two decode steps while sequences
are decoding, so a long prompt arriving stalls the running streams by one chunk at a time, not
by its whole prefill.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

try:
    import torch
except ImportError:         # only the ONNX runtime installed (runtime/onnx/): no torch on this box
    torch = None

from .buckets import BucketPolicy
from .kv_cache import BlockAllocator
from .sequence import Sequence, Status

# Returns why the sequence ends after this token ("stop", "length"), or None to go on.
Finish = Callable[[Sequence, int], "str | None"]


@dataclass
class Work:
    """One step's worth of work: what the engine runs next."""
    kind: str                          # "vision" | "prefill" | "decode"
    seqs: list[Sequence]
    start: int = 0                     # vision: first tile; prefill: first token position
    size: int = 0                      # vision: tiles bucket; prefill: chunk bucket (tokens)

    @property
    def count(self) -> int:
        """Real tiles (vision) or tokens (prefill) in this chunk; the rest of `size` is padding."""
        seq = self.seqs[0]
        if self.kind == "vision":
            return min(self.size, seq.pixel_values.shape[0] - self.start)
        if self.kind == "prefill":
            return min(self.size, len(seq) - self.start)
        return len(self.seqs)


@dataclass
class StepRecord:
    """What one `Engine.step()` did."""
    kind: str                          # "vision" | "prefill" | "decode"
    seq_ids: list[int]
    new_tokens: int                    # tokens sampled in this step
    seconds: float
    finished: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, policy: BucketPolicy, is_stop: Finish,
                 prefill_chunks_per_decode: Optional[int] = None):
        self.allocator, self.policy, self.is_stop = allocator, policy, is_stop
        self.prefill_chunks_per_decode = prefill_chunks_per_decode
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._chunks_since_decode = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        for queue in (self.waiting, self.prefilling, self.running):
            if seq in queue:
                queue.remove(seq)
        if seq.status is not Status.FINISHED:
            self._finish(seq, "cancelled")

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # -- planning -----------------------------------------------------------------------------
    def schedule(self) -> Optional[Work]:
        k = self.prefill_chunks_per_decode
        if not self.running or k is None or self._chunks_since_decode < k:
            work = self._next_prefill()
            if work is not None:
                self._chunks_since_decode += 1
                return work
        if self.running:
            work = self._plan_decode()
            if work is not None:
                self._chunks_since_decode = 0
                return work
        return self._next_prefill()

    def _next_prefill(self) -> Optional[Work]:
        """The next vision or prefill chunk: of the sequence being prefilled, else of a newly
        admitted one; None when nothing waits or nothing more fits."""
        self._admit()
        if not self.prefilling:
            return None
        seq = self.prefilling[0]
        if seq.pixel_values is not None:
            start = seq.tiles_encoded
            return Work("vision", [seq], start, self.policy.vision_chunk(seq.pixel_values.shape[0] - start))
        start = seq.num_cached
        return Work("prefill", [seq], start, self.policy.prefill_chunk(len(seq) - start))

    def _admit(self) -> None:
        """Give blocks to every waiting sequence that fits (in arrival order), as vLLM admits."""
        while self.waiting and len(self.running) + len(self.prefilling) < self.policy.max_batch:
            seq = self.waiting[0]
            if not self.allocator.can_allocate(len(seq) + 1):
                if not self.running and not self.prefilling:
                    raise RuntimeError(f"the KV cache ({self.allocator.num_free_blocks} free blocks) cannot "
                                       f"hold one {len(seq)}-token sequence: raise --kv-cache-gb")
                return
            self.waiting.popleft()
            self.allocator.allocate(seq.seq_id, len(seq))
            seq.status = Status.RUNNING
            self.prefilling.append(seq)

    def _plan_decode(self) -> Optional[Work]:
        for seq in list(self.running):
            while seq in self.running and not self.allocator.can_append(seq.seq_id, len(seq)):
                self._preempt(self.prefilling[-1] if self.prefilling else self.running[-1])
            if seq in self.running:
                self.allocator.append_slot(seq.seq_id, len(seq))
        return Work("decode", list(self.running)) if self.running else None

    def _preempt(self, seq: Sequence) -> None:
        (self.running if seq in self.running else self.prefilling).remove(seq)
        self.allocator.free(seq.seq_id)
        seq.num_cached, seq.status = 0, Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- results --------------------------------------------------------------------------------
    def vision_done(self, work: Work, embeds: torch.Tensor) -> None:
        seq = work.seqs[0]
        seq.embed_parts.append(embeds)
        seq.tiles_encoded += work.count
        if seq.tiles_encoded >= seq.pixel_values.shape[0]:
            parts = seq.embed_parts     # numpy arrays from the torch-free ONNX engine, tensors otherwise
            seq.image_embeds = torch.cat(parts) if torch is not None and isinstance(parts[0], torch.Tensor) \
                else np.concatenate(parts)
            seq.pixel_values, seq.embed_parts = None, []

    def prefill_done(self, work: Work) -> bool:
        """Marks the chunk's tokens cached; True when the prompt is complete and a token is due."""
        seq = work.seqs[0]
        seq.num_cached = work.start + work.count
        return seq.num_cached >= len(seq)

    def tokens_sampled(self, work: Work, tokens: list[int]) -> list[int]:
        """Appends each sequence's new token; returns the ids of the sequences that finished."""
        finished = []
        for seq, tok in zip(work.seqs, tokens):
            seq.num_cached = len(seq)
            seq.output_ids.append(tok)
            if seq.t_first_token is None:
                seq.t_first_token = time.perf_counter()
            if seq in self.prefilling:
                self.prefilling.remove(seq)
                self.running.append(seq)
            if seq.on_token:
                seq.on_token(seq, tok)
                if seq.status is Status.FINISHED:       # the callback cancelled it (a stop string)
                    finished.append(seq.seq_id)
                    continue
            reason = self.is_stop(seq, tok)
            if reason:
                if seq in self.running:
                    self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq.seq_id)
        return finished

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.seq_id in self.allocator:
            self.allocator.free(seq.seq_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        seq.t_finish = time.perf_counter()
