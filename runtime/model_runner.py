"""Turns planned work into padded bucket inputs and calls the compiled graphs.

Graphs are looked up by `GraphKey` name (runtime/buckets.py); any callable with the stage's
signature works, so the same runner drives AOTInductor packages and, in tests, the eager
modules. The runner reads sequences and the allocator's block tables but changes neither:
the scheduler owns every piece of bookkeeping.
"""
from __future__ import annotations

from typing import Callable

try:
    import torch
except ImportError:         # only the ONNX runtime installed (runtime/onnx/): no torch on this box
    torch = None

from .buckets import BLOCK_TABLE_INPUT, BucketPolicy, GraphKey
from .kv_cache import BlockAllocator, KVPool
from .sequence import Sequence
from .spec import BucketSpec

Graph = Callable[..., "torch.Tensor"]
MIN_EXACT_CHUNK = 2      # compile/export.py: Dim("chunk_tokens", min=2)


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def table_width_is_dynamic(graph) -> bool:
    """Whether a prefill/decode graph takes block tables of any width up to its context bucket's
    (compile/export.py `dynamic_tables`), as its recorded input signature says (None: dynamic)."""
    sig = getattr(graph, "input_signature", None)
    if not sig:
        return False
    return any(name in BLOCK_TABLE_INPUT.values() and shape[1] is None for name, _, shape in sig)


def chunk_length_is_dynamic(graph) -> bool:
    """Whether a prefill graph takes chunks of any length up to its bucket's T (compile/export.py
    `dynamic_tokens`), as its recorded input signature says: input_ids' length None."""
    sig = getattr(graph, "input_signature", None)
    return bool(sig) and any(name == "input_ids" and shape[0] is None for name, _, shape in sig)


class ModelRunner:
    def __init__(self, graphs: dict[str, Graph], buckets: BucketSpec, pool: KVPool, allocator: BlockAllocator,
                 hidden_size: int, image_token_id: int, dtype: torch.dtype, device: torch.device):
        self.graphs, self.pool, self.allocator = graphs, pool, allocator
        self.policy = BucketPolicy(buckets)
        self.block_size = self.policy.block_size
        self.hidden, self.image_token_id = hidden_size, image_token_id
        self.dtype, self.device = dtype, device
        # Graphs that take only the blocks in use (attention then reads no padded context).
        self._trim = {name for name, g in graphs.items() if table_width_is_dynamic(g)}
        # Prefill graphs that take a chunk of n <= T tokens as n rows (no padding to the bucket).
        self._exact = {name for name, g in graphs.items() if name.startswith("prefill") and chunk_length_is_dynamic(g)}
        self.policy.exact_chunks = bool(self._exact) and all(
            k.name() in self._exact for k in self.policy.prefill_keys())

    @property
    def max_context(self) -> int:
        return self.policy.max_context

    @property
    def max_batch(self) -> int:
        return self.policy.max_batch

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _table(self, seq: Sequence, width: int) -> list[int]:
        """The first `width` blocks of seq's table, padded with the sink block 0 (blocks past `width`
        hold no key the graph's queries may see)."""
        table = self.allocator.block_table(seq.seq_id)[:width]
        return table + [0] * (width - len(table))

    # -- vision ---------------------------------------------------------------------------------
    def vision_chunk(self, pixel_values: torch.Tensor, size: int) -> torch.Tensor:
        """Up to `size` tiles [n, 3, 448, 448] through the vision_n{size} graph -> [n * 256, hidden]."""
        n = pixel_values.shape[0]
        chunk = pixel_values.to(device=self.device, dtype=self.dtype)
        if n < size:
            chunk = torch.cat([chunk, chunk.new_zeros((size - n,) + tuple(chunk.shape[1:]))])
        emb = _first(self.graphs[GraphKey("vision", size).name()](chunk))[:n]
        return emb.reshape(-1, emb.shape[-1])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All tiles at once (tools and tests): the same chunks the scheduler would plan."""
        out, i, n = [], 0, pixel_values.shape[0]
        while i < n:
            size = self.policy.vision_chunk(n - i)
            out.append(self.vision_chunk(pixel_values[i:i + size], size))
            i += size
        return torch.cat(out)

    # -- prefill --------------------------------------------------------------------------------
    def prefill_chunk(self, seq: Sequence, start: int, t: int) -> torch.Tensor:
        """Writes K/V for tokens [start, start + n) of seq, n = min(t, what is left), through the
        t-token chunk graph; returns the logits [1, V] of the chunk's last real token."""
        ids = seq.all_ids
        n = min(t, len(ids) - start)
        key = self.policy.prefill_key(t, start + n)
        if key.name() in self._exact:
            t = max(n, MIN_EXACT_CHUNK)             # n rows (the graph's chunk dimension starts at 2)
        pos = list(range(start, start + n))
        chunk_ids = ids[start:start + n] + [0] * (t - n)
        slots = self.allocator.slot_mapping(seq.seq_id, pos) + [0] * (t - n)
        embeds = torch.zeros(t, self.hidden, dtype=self.dtype, device=self.device)
        mask = torch.zeros(t, dtype=torch.bool, device=self.device)
        if seq.image_embeds is not None:
            rows = self._image_rows(seq, ids)[start:start + n]
            hit = rows >= 0
            mask[:n] = hit
            embeds[:n][hit] = seq.image_embeds[rows[hit]].to(self.dtype)
        width = key.context // self.block_size      # the chunk's keys all lie in the first `width` blocks
        if key.name() in self._trim:
            width = -(-(start + n) // self.block_size)
        block_table = self._long([self._table(seq, width)])
        return _first(self.graphs[key.name()](
            self._long(chunk_ids), self._long(pos + [0] * (t - n)), embeds, mask, self._long(slots),
            block_table, self._long([n - 1]), self.pool.k_cache, self.pool.v_cache))

    def prefill(self, seq: Sequence, start: int = 0) -> torch.Tensor:
        """Every token of seq from `start` on, chunk after chunk (tools and tests); logits [1, V]
        of the last one. The sequence must hold blocks for all its tokens."""
        logits = None
        while start < len(seq):
            t = self.policy.prefill_chunk(len(seq) - start)
            logits = self.prefill_chunk(seq, start, t)
            start += min(t, len(seq) - start)
        return logits

    def _image_rows(self, seq: Sequence, ids: list[int]) -> torch.Tensor:
        """For each token, the row of seq.image_embeds it takes, or -1."""
        is_img = torch.tensor(ids, device=self.device) == self.image_token_id
        rows = torch.cumsum(is_img.long(), 0) - 1
        if int(is_img.sum()) != seq.image_embeds.shape[0]:
            raise ValueError(f"prompt has {int(is_img.sum())} image-context tokens but the images give "
                             f"{seq.image_embeds.shape[0]} embeddings")
        return torch.where(is_img, rows, torch.full_like(rows, -1))

    # -- decode ---------------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One step for every sequence (its last token is not yet cached) -> logits [len(seqs), V]."""
        longest = max(len(s) for s in seqs)
        key = self.policy.decode_key(len(seqs), longest)
        b, mb = key.size, key.context // self.block_size
        if key.name() in self._trim:                # the blocks that hold the longest sequence's keys
            mb = -(-longest // self.block_size)
        ids, pos, slots, tables = [], [], [], []
        for s in seqs:
            p = len(s) - 1
            ids.append(s.all_ids[-1])
            pos.append(p)
            slots.extend(self.allocator.slot_mapping(s.seq_id, [p]))
            tables.append(self._table(s, mb))
        pad = b - len(seqs)
        ids += [0] * pad
        pos += [0] * pad
        slots += [0] * pad
        tables += [[0] * mb] * pad
        logits = _first(self.graphs[key.name()](
            self._long(ids), self._long(pos), self._long(slots), self._long(tables),
            self.pool.k_cache, self.pool.v_cache))
        return logits[:len(seqs)]
