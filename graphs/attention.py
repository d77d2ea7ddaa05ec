"""Attention over the paged KV cache, one formulation for prefill chunks and decode steps.

Cache layout per rank (see docs/CONTRACTS.md): k_cache, v_cache
`[layers, num_blocks, block_size, kv_heads, head_dim]`, written in place.
A token's slot is `block_id * block_size + offset`; block 0 is the padding sink.
Keys are addressed by their index in the sequence, so a query at position p sees exactly
the keys at indices 0..p: causal masking, earlier prefill chunks and decode are one rule.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# The decode step's attention as one call to a CPU kernel (kernels/paged_attention.cpp,
# internvl::paged_decode_attention), instead of the multiply + sum formulation of _decode_attention:
# set by the compile pipeline (decode_kernel) while it exports the graphs of a CPU target that has it.
_decode_kernel = None


@contextlib.contextmanager
def decode_kernel(op):
    """Graphs traced inside this block call `op` (torch.ops.internvl.paged_decode_attention, or None for
    the graph formulation) for decode attention over bf16 or fp32 caches."""
    global _decode_kernel
    prev, _decode_kernel = _decode_kernel, op
    try:
        yield
    finally:
        _decode_kernel = prev


def write_kv(cache: torch.Tensor, layer: int, slot_mapping: torch.Tensor, kv: torch.Tensor) -> None:
    """Store kv [N, kv_heads, head_dim] of one layer at the flat slots `slot_mapping` [N].

    Indexed on the 5-D cache input itself: an index_copy_ into a view of the input made
    AOTInductor copy the whole pool on every write (measured: 16 s per 2B decode step).
    """
    block_size = cache.shape[2]
    layer_idx = torch.full_like(slot_mapping, layer)
    cache.index_put_((layer_idx, slot_mapping // block_size, slot_mapping % block_size), kv.to(cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int,
                    block_tables: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, T, heads, d] at `positions` [B, T] over the blocks in block_tables [B, max_blocks].

    Returns [B, T, heads, d]. GQA groups are handled by reshaping q, never by copying K/V per
    query head. A decode step (T == 1) and a prefill chunk need different formulations, chosen
    by measurement (AOTInductor, bf16, 2-core EPYC, per layer, 2B shapes; build notes in
    docs/performance.md): gathering the blocks into new tensors and multiplying them cost
    65 ms at batch 8 x 1,024 keys, mostly the copies; the gather-free reduction below 4.4 ms.
    """
    if q.shape[1] == 1:
        if (_decode_kernel is not None and q.device.type == "cpu" and q.shape[-1] % 16 == 0
                and q.dtype in (torch.bfloat16, torch.float32) and k_cache.dtype == q.dtype):
            return _decode_kernel(q, k_cache, v_cache, layer, block_tables, positions, scale)
        return _decode_attention(q, k_cache, v_cache, layer, block_tables, positions, scale)
    return _chunk_attention(q, k_cache, v_cache, layer, block_tables, positions, scale)


def _decode_attention(q, k_cache, v_cache, layer, block_tables, positions, scale):
    """One query per sequence: scores and output as multiply + sum over the cache's blocks.

    Written as broadcasts and reductions (not matmuls), Inductor fuses the block-table lookup
    into the reduction loops: each K/V row is read once from the pool in its own dtype and
    converted in registers, with fp32 accumulation; no gathered copy is ever materialized.
    """
    b, _, heads, d = q.shape
    kv_heads, block_size = k_cache.shape[-2], k_cache.shape[2]
    g = heads // kv_heads
    k = k_cache[layer][block_tables]                                      # [B, nb, bs, kvh, d]
    v = v_cache[layer][block_tables]
    qg = q.reshape(b, 1, 1, kv_heads, g, d).float()
    scores = (qg * k[:, :, :, :, None, :].float()).sum(-1) * scale       # [B, nb, bs, kvh, g]
    key_index = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    hidden = (key_index[None, :] > positions).view(b, -1, block_size)    # [B, nb, bs]
    scores = scores.masked_fill(hidden[..., None, None], float("-inf"))
    probs = torch.softmax(scores.flatten(1, 2), dim=1).view_as(scores)
    out = (probs[..., None] * v[:, :, :, :, None, :].float()).sum((1, 2))  # [B, kvh, g, d]
    return out.reshape(b, 1, heads, d).to(q.dtype)


def _chunk_attention(q, k_cache, v_cache, layer, block_tables, positions, scale):
    """A prefill chunk (T queries): the blocks gathered once, then scaled_dot_product_attention
    (on CPU the flash kernel: inputs in their dtype, fp32 accumulation and softmax, no score
    matrix in memory). The GQA group is folded into the query length."""
    b, t, heads, d = q.shape
    kv_heads = k_cache.shape[-2]
    g = heads // kv_heads
    k = k_cache[layer][block_tables].flatten(1, 2).transpose(1, 2)        # [B, kvh, S, d]
    v = v_cache[layer][block_tables].flatten(1, 2).transpose(1, 2)
    qg = q.reshape(b, t, kv_heads, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    s = k.shape[2]
    visible = torch.arange(s, device=q.device)[None, None, :] <= positions[:, :, None]    # [B, T, S]
    mask = visible[:, None, None].expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)   # [B, kvh, g*T, d]
    return out.reshape(b, kv_heads, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, heads, d)
