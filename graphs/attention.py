"""Attention over the paged KV cache.

Cache layout per rank (see docs/CONTRACTS.md): k_cache, v_cache
`[layers, num_blocks, block_size, kv_heads, head_dim]`, written in place.
A token's slot is `block_id * block_size + offset`; block 0 is the padding sink.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(cache: torch.Tensor, layer: int, slot_mapping: torch.Tensor, kv: torch.Tensor) -> None:
    """Store kv [T, kv_heads, head_dim] of one layer at the flat slots `slot_mapping` [T]."""
    flat = cache[layer].view(-1, cache.shape[-2], cache.shape[-1])
    flat.index_copy_(0, slot_mapping, kv.to(cache.dtype))


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one sequence over its own tokens.

    q [T, heads, d], k/v [T, kv_heads, d] -> [T, heads, d]. Padding sits after the real tokens,
    so under the causal mask no real token attends to it.
    """
    t, heads, d = q.shape
    group = heads // k.shape[1]
    if group > 1:
        k = k[:, :, None, :].expand(t, k.shape[1], group, d).reshape(t, heads, d)
        v = v[:, :, None, :].expand(t, v.shape[1], group, d).reshape(t, heads, d)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)
    return out.transpose(0, 1)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence over the blocks named by block_tables.

    q [B, heads, d]; block_tables [B, max_blocks]; context_lens [B] (including this token)
    -> [B, heads, d]. Scores are computed in fp32; keys past context_lens are masked.
    """
    b, heads, d = q.shape
    kv_heads = k_cache.shape[-2]
    k = k_cache[layer][block_tables].flatten(1, 2)            # [B, S, kv_heads, d]
    v = v_cache[layer][block_tables].flatten(1, 2)
    qg = q.view(b, kv_heads, heads // kv_heads, d).float()
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k.float()) * scale
    span = torch.arange(k.shape[1], device=q.device)
    masked = span[None, :] >= context_lens[:, None]           # [B, S]
    scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgs,bskd->bkgd", probs, v.float())
    return out.reshape(b, heads, d).to(q.dtype)
