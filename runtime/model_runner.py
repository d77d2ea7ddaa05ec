"""Turns sequences into padded bucket inputs and calls the compiled graphs.

Graphs are looked up by name (vision_n{N}, prefill_t{T}_c{C}, decode_b{B}_c{C}); any callable
with the stage's signature works, so the same runner drives AOTInductor packages and, in
tests, the eager modules.
"""
from __future__ import annotations

import bisect
from typing import Callable

import torch

from .kv_cache import BlockAllocator, KVPool
from .sequence import Sequence

Graph = Callable[..., torch.Tensor]


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def smallest_at_least(buckets: list[int], n: int) -> int | None:
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class ModelRunner:
    CALL_COST = 32   # per-call overhead of a prefill chunk, in token-equivalents (weights re-read)

    def __init__(self, graphs: dict[str, Graph], buckets: dict, pool: KVPool, allocator: BlockAllocator,
                 hidden_size: int, image_token_id: int, dtype: torch.dtype, device: torch.device):
        self.graphs, self.pool, self.allocator = graphs, pool, allocator
        self.vision_buckets = sorted(buckets["vision"])
        self.prefill_buckets = sorted(buckets["prefill"])
        self.batch_buckets = sorted(buckets["batch"])
        self.context_buckets = sorted(buckets["context"])
        self.block_size = buckets["block_size"]
        self.hidden, self.image_token_id = hidden_size, image_token_id
        self.dtype, self.device = dtype, device

    @property
    def max_context(self) -> int:
        return self.context_buckets[-1]

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # -- vision ---------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, 448, 448] -> [tiles * 256, hidden]: largest bucket that fits, then smaller ones;
        only when no bucket fits the remainder is a chunk padded."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        out, i, n = [], 0, pixel_values.shape[0]
        while i < n:
            left = n - i
            fitting = [b for b in self.vision_buckets if b <= left]
            size = fitting[-1] if fitting else self.vision_buckets[0]
            chunk = pixel_values[i:i + size]
            if chunk.shape[0] < size:
                pad = chunk.new_zeros((size - chunk.shape[0],) + tuple(chunk.shape[1:]))
                chunk = torch.cat([chunk, pad])
            emb = _first(self.graphs[f"vision_n{size}"](chunk))
            out.append(emb[:min(size, left)])
            i += size
        embeds = torch.cat(out)
        return embeds.reshape(-1, embeds.shape[-1])

    # -- prefill --------------------------------------------------------------------------------
    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Writes K/V for every not-yet-cached token of seq (in chunks); logits [1, V] of the last one."""
        ids = seq.all_ids
        image_rows = self._image_rows(seq, ids)
        logits = None
        while seq.num_cached < len(ids):
            start = seq.num_cached
            left = len(ids) - start
            t = self.prefill_chunk(left)
            n = min(t, left)
            pos = list(range(start, start + n))
            chunk_ids = ids[start:start + n] + [0] * (t - n)
            slots = self.allocator.slot_mapping(seq.seq_id, pos) + [0] * (t - n)
            embeds = torch.zeros(t, self.hidden, dtype=self.dtype, device=self.device)
            mask = torch.zeros(t, dtype=torch.bool, device=self.device)
            if image_rows is not None:
                rows = image_rows[start:start + n]
                hit = rows >= 0
                mask[:n] = hit
                embeds[:n][hit] = seq.image_embeds[rows[hit]].to(self.dtype)
            name, c = self.prefill_graph(t, start + n)
            width = c // self.block_size      # the chunk's keys all lie in the first `width` blocks
            table = self.allocator.block_table(seq.seq_id)[:width]
            block_table = self._long([table + [0] * (width - len(table))])
            logits = _first(self.graphs[name](
                self._long(chunk_ids), self._long(pos + [0] * (t - n)), embeds, mask, self._long(slots),
                block_table, self._long([n - 1]), self.pool.k_cache, self.pool.v_cache))
            seq.num_cached = start + n
        return logits

    def prefill_graph(self, t: int, context: int) -> tuple[str, int]:
        """The graph for a chunk of t tokens ending at sequence length `context`, and its context
        bucket: the smallest that holds the chunk's keys. Artifacts of format 1 built before context
        buckets applied to prefill have one prefill_t{T} graph per chunk size, over the largest context."""
        for c in self.context_buckets:
            if c >= context and f"prefill_t{t}_c{c}" in self.graphs:
                return f"prefill_t{t}_c{c}", c
        return f"prefill_t{t}", self.max_context

    def prefill_chunk(self, left: int) -> int:
        """Chunk size for the next prefill call: full largest chunks first, then the bucket that
        pads the rest least, counting each extra call as CALL_COST tokens of work."""
        largest = self.prefill_buckets[-1]
        if left >= largest:
            return largest
        return min(self.prefill_buckets, key=lambda b: (-(-left // b) * (b + self.CALL_COST), -b))

    def _image_rows(self, seq: Sequence, ids: list[int]) -> torch.Tensor | None:
        """For each token, the row of seq.image_embeds it takes, or -1."""
        if seq.image_embeds is None:
            return None
        is_img = torch.tensor(ids, device=self.device) == self.image_token_id
        rows = torch.cumsum(is_img.long(), 0) - 1
        if int(is_img.sum()) != seq.image_embeds.shape[0]:
            raise ValueError(f"prompt has {int(is_img.sum())} image-context tokens but the images give "
                             f"{seq.image_embeds.shape[0]} embeddings")
        return torch.where(is_img, rows, torch.full_like(rows, -1))

    # -- decode ---------------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One step for every sequence (its last token is not yet cached) -> logits [len(seqs), V]."""
        b = smallest_at_least(self.batch_buckets, len(seqs))
        longest = max(len(s) for s in seqs)
        c = smallest_at_least(self.context_buckets, longest)
        if b is None or c is None:
            raise ValueError(f"decode batch {len(seqs)} / context {longest} exceeds the artifact's buckets")
        mb = c // self.block_size
        ids, pos, slots, tables = [], [], [], []
        for s in seqs:
            p = len(s) - 1
            ids.append(s.all_ids[-1])
            pos.append(p)
            slots.extend(self.allocator.slot_mapping(s.seq_id, [p]))
            tables.append(self.allocator.block_table(s.seq_id, pad_to=mb))
        pad = b - len(seqs)
        ids += [0] * pad
        pos += [0] * pad
        slots += [0] * pad
        tables += [[0] * mb] * pad
        logits = _first(self.graphs[f"decode_b{b}_c{c}"](
            self._long(ids), self._long(pos), self._long(slots), self._long(tables),
            self.pool.k_cache, self.pool.v_cache))
        for s in seqs:
            s.num_cached = len(s)
        return logits[:len(seqs)]
