"""The graph variant BACKEND=onnx exports: the same graphs/ modules and weights, with KV-cache I/O
that needs no in-place op.

ONNX has no in-place operators, and exporting the AOTInductor stage modules (which `index_put_`
into the pool inputs) would make the whole pool a graph output: a pool-sized copy per step. So the
prefill and decode stages here only *read* the pool and return this step's new K/V rows:

    prefill(input_ids, positions, image_embeds, image_mask, slot_mapping, block_table, last_index,
            k_cache, v_cache) -> (logits [1, V], new_k [L, T, kvh, d], new_v [L, T, kvh, d])
    decode(input_ids, positions, slot_mapping, block_tables, k_cache, v_cache)
            -> (logits [B, V], new_k [L, B, kvh, d], new_v [L, B, kvh, d])

and the runtime writes new_k/new_v into the pool at `slot_mapping` before the next call
(runtime/onnx/pool.py). Inside the graph a query attends over the keys already in the pool
(gathered by block table: context-sized, never pool-sized; positions < the chunk's first position)
and over this call's own keys (causally, by index in the chunk: padding sits at the chunk's end).
The pool is indexed as one flat [L * num_blocks, ...] tensor (a Reshape, no copy in onnxruntime),
because `k_cache[layer]` would be a Gather that copies a whole layer of the pool.

The vision stage is graphs/model.py's VisionStage unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...graphs.model import InternVL
from ...graphs.rotary import apply_rotary


def _gathered(cache: torch.Tensor, layer: int, block_tables: torch.Tensor) -> torch.Tensor:
    """The blocks of block_tables [B, mb] of one layer -> [B, mb * block_size, kvh, d]."""
    layers, nb, bs, kvh, d = cache.shape
    flat = cache.reshape(layers * nb, bs, kvh, d)
    rows = flat.index_select(0, (block_tables + layer * nb).reshape(-1))
    return rows.reshape(block_tables.shape[0], block_tables.shape[1] * bs, kvh, d)


def pool_attention(q, k_new, v_new, k_cache, v_cache, layer: int, block_tables, positions, scale: float):
    """q [B, T, heads, d], this call's k/v [B, T, kvh, d] at positions [B, T] (contiguous per row).

    Keys: the pool's rows at sequence index j < positions[:, 0] (earlier chunks / earlier tokens),
    then the call's own T keys, key i visible to query t when i <= t."""
    b, t, heads, d = q.shape
    kvh = k_new.shape[2]
    g = heads // kvh
    k_old = _gathered(k_cache, layer, block_tables).to(q.dtype)
    v_old = _gathered(v_cache, layer, block_tables).to(q.dtype)
    s = k_old.shape[1]
    k = torch.cat([k_old, k_new], dim=1).transpose(1, 2)                  # [B, kvh, S + T, d]
    v = torch.cat([v_old, v_new], dim=1).transpose(1, 2)
    old_visible = torch.arange(s, device=q.device)[None, None, :] < positions[:, :1, None]   # [B, 1, S]
    idx = torch.arange(t, device=q.device)
    new_visible = (idx[None, :] <= idx[:, None])[None]                                       # [1, T, T]
    visible = torch.cat([old_visible.expand(b, t, s), new_visible.expand(b, t, t)], dim=2)  # [B, T, S + T]
    qg = q.reshape(b, t, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    mask = visible[:, None, None].expand(b, 1, g, t, s + t).reshape(b, 1, g * t, s + t)
    scores = torch.matmul(qg, k.transpose(2, 3)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)            # [B, kvh, g*T, d]
    return out.reshape(b, kvh, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, heads, d)


class _PoolReadingLM(nn.Module):
    """LanguageModel's layer loop, with each attention reading the pool and returning its new K/V."""

    def __init__(self, model: InternVL):
        super().__init__()
        self.language_model = model.language_model

    def run(self, x, positions, block_tables, k_cache, v_cache):
        lm = self.language_model
        cos, sin = lm.rotary(positions, x.dtype)
        new_k, new_v = [], []
        for layer in lm.layers:
            a = layer.self_attn
            h = layer.input_layernorm(x)
            b, t, _ = h.shape
            q = a.q_proj(h).view(b * t, a.heads, a.head_dim)
            k = a.k_proj(h).view(b * t, a.kv_heads, a.head_dim)
            if a.q_norm is not None:
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            v = a.v_proj(h).view(b * t, a.kv_heads, a.head_dim)
            # Rounded to the pool's dtype as the pool would hold them, so attention sees what a later call sees.
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
            new_k.append(k)
            new_v.append(v)
            out = pool_attention(q.view(b, t, a.heads, a.head_dim), k.view(b, t, a.kv_heads, a.head_dim).to(q.dtype),
                                 v.view(b, t, a.kv_heads, a.head_dim).to(q.dtype), k_cache, v_cache, a.layer,
                                 block_tables, positions, a.scale)
            x = x + a.o_proj(out.reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x, torch.stack(new_k), torch.stack(new_v)


class OnnxPrefillStage(_PoolReadingLM):
    def forward(self, input_ids, positions, image_embeds, image_mask, slot_mapping, block_table, last_index,
                k_cache, v_cache):
        lm = self.language_model
        x = lm.embed(input_ids, image_embeds, image_mask)[None]
        h, new_k, new_v = self.run(x, positions[None], block_table, k_cache, v_cache)
        return lm.lm_head(lm.norm(h[0].index_select(0, last_index))), new_k, new_v


class OnnxDecodeStage(_PoolReadingLM):
    def forward(self, input_ids, positions, slot_mapping, block_tables, k_cache, v_cache):
        lm = self.language_model
        x = lm.embed(input_ids)[:, None]
        h, new_k, new_v = self.run(x, positions[:, None], block_tables, k_cache, v_cache)
        return lm.lm_head(lm.norm(h[:, 0])), new_k, new_v


def onnx_stage_module(model: InternVL, stage: str) -> nn.Module:
    from ...graphs.model import VisionStage
    return {"vision": VisionStage, "prefill": OnnxPrefillStage, "decode": OnnxDecodeStage}[stage](model)
