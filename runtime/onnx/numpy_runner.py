"""The torch-free twins of kv_cache.KVPool, model_runner.ModelRunner and sampler.Sampler, on numpy.

Same padding, chunking and bucket choices as runtime/model_runner.py (the BucketPolicy and the
BlockAllocator are shared, not copied), so a BACKEND=onnx artifact gives the same graph calls with or
without torch. The sampler matches runtime/sampler.py's rules (vocab mask, repetition penalty,
temperature, top-k, top-p in transformers' order); greedy tokens are identical, sampled ones come from
numpy's generator (seeded per request), not torch's, so a seed draws a different stream than the torch
engine does.
"""
from __future__ import annotations

import numpy as np

from ..buckets import BucketPolicy, GraphKey
from ..kv_cache import GiB, BlockAllocator, free_memory_bytes

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class NumpyKVPool:
    """k_cache, v_cache `[layers, num_blocks, block_size, kv_heads, head_dim]`, allocated once, zero-filled
    (every page touched: committed up front, as KVPool does)."""

    def __init__(self, layers, kv_heads, head_dim, block_size, dtype, num_blocks):
        shape = (layers, num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = np.zeros(shape, dtype)
        self.v_cache = np.zeros(shape, dtype)
        self.k_cache.fill(0)
        self.v_cache.fill(0)

    @classmethod
    def from_budget(cls, layers, kv_heads, head_dim, block_size, dtype, budget_bytes=None, max_blocks=None,
                    fraction_of_free=0.5):
        per_block = 2 * layers * block_size * kv_heads * head_dim * np.dtype(dtype).itemsize
        if budget_bytes is None:
            budget_bytes = int(free_memory_bytes("cpu") * fraction_of_free)
            blocks = min(max_blocks, budget_bytes // per_block) if max_blocks else budget_bytes // per_block
        else:
            blocks = budget_bytes // per_block
        if blocks < 2:
            raise RuntimeError(f"KV-cache budget {budget_bytes / GiB:.3g} GiB holds {blocks} blocks of "
                               f"{per_block / 2**20:.2f} MiB; at least 2 are needed: raise --kv-cache-gb")
        return cls(layers, kv_heads, head_dim, block_size, dtype, int(blocks))

    @property
    def num_blocks(self) -> int:
        return self.k_cache.shape[1]


class NumpyRunner:
    """runtime/model_runner.py on numpy arrays (graphs: runtime/onnx/graphs.py OnnxGraph)."""

    def __init__(self, graphs: dict, buckets, pool: NumpyKVPool, allocator: BlockAllocator, hidden_size: int,
                 image_token_id: int, dtype):
        self.graphs, self.pool, self.allocator = graphs, pool, allocator
        self.policy = BucketPolicy(buckets)
        self.block_size = self.policy.block_size
        self.hidden, self.image_token_id, self.dtype = hidden_size, image_token_id, dtype

    @property
    def max_context(self) -> int:
        return self.policy.max_context

    @property
    def max_batch(self) -> int:
        return self.policy.max_batch

    @staticmethod
    def _long(values) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)

    def vision_chunk(self, pixel_values: np.ndarray, size: int) -> np.ndarray:
        n = pixel_values.shape[0]
        chunk = np.asarray(pixel_values, dtype=self.dtype)
        if n < size:
            chunk = np.concatenate([chunk, np.zeros((size - n,) + chunk.shape[1:], self.dtype)])
        emb = self.graphs[GraphKey("vision", size).name()](chunk)[:n]
        return emb.reshape(-1, emb.shape[-1])

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        out, i, n = [], 0, pixel_values.shape[0]
        while i < n:
            size = self.policy.vision_chunk(n - i)
            out.append(self.vision_chunk(pixel_values[i:i + size], size))
            i += size
        return np.concatenate(out)

    def prefill_chunk(self, seq, start: int, t: int) -> np.ndarray:
        ids = seq.all_ids
        n = min(t, len(ids) - start)
        pos = list(range(start, start + n))
        chunk_ids = ids[start:start + n] + [0] * (t - n)
        slots = self.allocator.slot_mapping(seq.seq_id, pos) + [0] * (t - n)
        embeds = np.zeros((t, self.hidden), self.dtype)
        mask = np.zeros(t, np.bool_)
        if seq.image_embeds is not None:
            rows = self._image_rows(seq, ids)[start:start + n]
            hit = rows >= 0
            mask[:n] = hit
            embeds[:n][hit] = seq.image_embeds[rows[hit]]
        key = self.policy.prefill_key(t, start + n)
        width = key.context // self.block_size
        table = self.allocator.block_table(seq.seq_id)[:width]
        return self.graphs[key.name()](
            self._long(chunk_ids), self._long(pos + [0] * (t - n)), embeds, mask, self._long(slots),
            self._long([table + [0] * (width - len(table))]), self._long([n - 1]), self.pool.k_cache, self.pool.v_cache)

    def prefill(self, seq, start: int = 0) -> np.ndarray:
        logits = None
        while start < len(seq):
            t = self.policy.prefill_chunk(len(seq) - start)
            logits = self.prefill_chunk(seq, start, t)
            start += min(t, len(seq) - start)
        return logits

    def _image_rows(self, seq, ids) -> np.ndarray:
        is_img = np.asarray(ids) == self.image_token_id
        if int(is_img.sum()) != seq.image_embeds.shape[0]:
            raise ValueError(f"prompt has {int(is_img.sum())} image-context tokens but the images give "
                             f"{seq.image_embeds.shape[0]} embeddings")
        return np.where(is_img, np.cumsum(is_img) - 1, -1)

    def decode(self, seqs) -> np.ndarray:
        key = self.policy.decode_key(len(seqs), max(len(s) for s in seqs))
        b, mb = key.size, key.context // self.block_size
        ids, pos, slots, tables = [], [], [], []
        for s in seqs:
            p = len(s) - 1
            ids.append(s.all_ids[-1])
            pos.append(p)
            slots.extend(self.allocator.slot_mapping(s.seq_id, [p]))
            tables.append(self.allocator.block_table(s.seq_id, pad_to=mb))
        pad = b - len(seqs)
        logits = self.graphs[key.name()](
            self._long(ids + [0] * pad), self._long(pos + [0] * pad), self._long(slots + [0] * pad),
            self._long(tables + [[0] * mb] * pad), self.pool.k_cache, self.pool.v_cache)
        return logits[:len(seqs)]


def make_rng(params):
    """The per-sequence random stream (None for greedy); numpy's, seeded by params.seed."""
    return None if params.greedy else np.random.default_rng(params.seed)


class NumpySampler:
    def __init__(self, vocab_limit: int | None = None):
        self.vocab_limit = vocab_limit

    def __call__(self, logits: np.ndarray, params, history=None, generators=None) -> np.ndarray:
        scores = self.penalize(np.asarray(logits), params, history)
        out = scores.argmax(-1)
        for i, p in enumerate(params):
            if p.greedy:
                continue
            s = self.warp(scores[i].astype(np.float64), p)
            probs = np.exp(s - s.max())
            probs /= probs.sum()
            rng = generators[i] if generators is not None and generators[i] is not None else np.random.default_rng()
            out[i] = rng.choice(probs.shape[0], p=probs)
        return out

    def penalize(self, logits: np.ndarray, params, history) -> np.ndarray:
        if logits.ndim != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits must be [B, V] with B = len(params) = {len(params)}, got {logits.shape}")
        scores = logits.astype(np.float32, copy=True)
        if self.vocab_limit is not None and self.vocab_limit < scores.shape[1]:
            scores[:, self.vocab_limit:] = -np.inf
        for i, p in enumerate(params):
            if p.repetition_penalty == 1.0:
                continue
            if history is None or len(history) != len(params):
                raise ValueError("repetition_penalty needs one history of token ids per row")
            ids = np.unique(np.asarray(history[i], dtype=np.int64))
            ids = ids[ids < scores.shape[1]]
            row = scores[i, ids]
            scores[i, ids] = np.where(row < 0, row * p.repetition_penalty, row / p.repetition_penalty)
        return scores

    @staticmethod
    def warp(s: np.ndarray, p) -> np.ndarray:
        if p.temperature != 1.0:
            s = s / p.temperature
        if p.top_k > 0:
            k = min(p.top_k, s.shape[0])
            kth = np.sort(s)[::-1][k - 1]
            s = np.where(s < kth, -np.inf, s)
        if p.top_p < 1.0:
            order = np.argsort(s, kind="stable")                 # ascending
            sorted_s = s[order]
            e = np.exp(sorted_s - sorted_s.max())
            cum = np.cumsum(e / e.sum())
            remove = cum <= 1 - p.top_p
            remove[-1] = False
            s = s.copy()
            s[order[remove]] = -np.inf
        return s
