"""Attention over the paged KV cache, one formulation for prefill chunks and decode steps.

Cache layout per rank (see docs/CONTRACTS.md): k_cache, v_cache
`[layers, num_blocks, block_size, kv_heads, head_dim]`, written in place.
A token's slot is `block_id * block_size + offset`; block 0 is the padding sink.
Keys are addressed by their index in the sequence, so a query at position p sees exactly
the keys at indices 0..p: causal masking, earlier prefill chunks and decode are one rule.
"""
from __future__ import annotations

import torch


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
    query head; scores and softmax are fp32.
    """
    b, t, heads, d = q.shape
    kv_heads = k_cache.shape[-2]
    k = k_cache[layer][block_tables].flatten(1, 2)            # [B, S, kv_heads, d]
    v = v_cache[layer][block_tables].flatten(1, 2)
    qg = q.reshape(b, t, kv_heads, heads // kv_heads, d).float()
    scores = torch.einsum("btkgd,bskd->bkgts", qg, k.float()) * scale
    key_index = torch.arange(k.shape[1], device=q.device)
    hidden = key_index[None, None, :] > positions[:, :, None]  # [B, T, S]
    scores = scores.masked_fill(hidden[:, None, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgts,bskd->btkgd", probs, v.float())
    return out.reshape(b, t, heads, d).to(q.dtype)
