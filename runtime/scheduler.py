"""Continuous batching: admit waiting sequences while blocks and batch slots allow, prefill
them, then decode every running sequence one token per step. When the pool runs out of
blocks mid-decode, the most recently admitted sequence is preempted (its blocks freed, its
tokens kept) and prefilled again later: recompute preemption, as vLLM does."""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

import torch

from .kv_cache import BlockAllocator
from .model_runner import ModelRunner
from .sampler import Sampler
from .sequence import Sequence, Status

# Returns why the sequence ends after this token ("stop", "length"), or None to go on.
Finish = Callable[[Sequence, int], "str | None"]


class Scheduler:
    def __init__(self, runner: ModelRunner, allocator: BlockAllocator, sampler: Sampler, is_stop: Finish):
        self.runner, self.allocator, self.sampler, self.is_stop = runner, allocator, sampler, is_stop
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, "cancelled")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        admitted = self._admit()
        if admitted:
            return
        if self.running:
            self._decode()

    def _admit(self) -> bool:
        """Prefill as many waiting sequences as fit; True if any was prefilled."""
        batch = []
        while self.waiting and len(self.running) + len(batch) < self.runner.max_batch:
            seq = self.waiting[0]
            if not self.allocator.can_allocate(len(seq) + 1):
                if not self.running and not batch:
                    raise RuntimeError(f"the KV cache ({self.allocator.num_free_blocks} free blocks) cannot hold "
                                       f"one {len(seq)}-token sequence: raise --kv-cache-gb")
                break
            self.waiting.popleft()
            self.allocator.allocate(seq.seq_id, len(seq))
            seq.status = Status.RUNNING
            if seq.image_embeds is None and seq.pixel_values is not None:
                seq.image_embeds = self.runner.encode_images(seq.pixel_values)
                seq.pixel_values = None
            logits = self.runner.prefill(seq)
            self._sample([seq], logits)
            if seq.status is Status.RUNNING:
                batch.append(seq)
        self.running.extend(batch)
        return bool(batch)

    def _decode(self) -> None:
        for seq in list(self.running):
            while seq in self.running and not self.allocator.can_append(seq.seq_id, len(seq)):
                self._preempt(self.running[-1])
            if seq in self.running:
                self.allocator.append_slot(seq.seq_id, len(seq))
        if self.running:
            self._sample(list(self.running), self.runner.decode(self.running))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.seq_id)
        seq.num_cached, seq.status = 0, Status.WAITING
        self.waiting.appendleft(seq)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = self.sampler(logits, [s.params for s in seqs], [s.all_ids for s in seqs],
                              [s.generator for s in seqs]).tolist()
        for seq, tok in zip(seqs, tokens):
            seq.output_ids.append(tok)
            if seq.t_first_token is None:
                seq.t_first_token = time.perf_counter()
            if seq.on_token:
                seq.on_token(seq, tok)
            reason = self.is_stop(seq, tok)
            if reason:
                if seq in self.running:
                    self.running.remove(seq)
                self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.seq_id in self.allocator:
            self.allocator.free(seq.seq_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        seq.t_finish = time.perf_counter()
