"""The LLM decoder (InternLM2/3, Llama/Yi, Qwen2/2.5, Qwen3, Phi-3) with paged-KV prefill and decode steps.

Every backbone shares one structure once InternLM2's packed wqkv and Phi-3's fused qkv_proj /
gate_up_proj are split at load time: RMSNorm, GQA attention with RoPE (Qwen2: q/k/v bias;
Qwen3: an RMSNorm over each q and k head before RoPE; Phi-3: LongRoPE), SwiGLU MLP, untied head.
Linears are tensor-parallel aware (graphs/parallel.py); with world size 1 they are plain.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import paged_attention, write_kv
from .config import LLMConfig
from .norm import RMSNorm
from .parallel import (SINGLE, ColumnParallelLinear, ParallelLMHead, RowParallelLinear, TPInfo,
                       VocabParallelEmbedding)
from .rotary import apply_rotary, rotary_embedding


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int, tp: TPInfo):
        super().__init__()
        self.layer = layer
        d = cfg.head_dim
        self.heads = tp.shard(cfg.num_heads, "num_heads")
        # KV heads are replicated when there are fewer of them than ranks.
        self.kv_heads = tp.kv_heads(cfg.num_kv_heads)
        self.head_dim, self.scale = d, d ** -0.5
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * d, cfg.qkv_bias, tp)
        kv_tp = tp if cfg.num_kv_heads >= tp.world_size else SINGLE
        kv_out = cfg.num_kv_heads * d if kv_tp is tp else d
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, kv_out, cfg.qkv_bias, kv_tp)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, kv_out, cfg.qkv_bias, kv_tp)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, False, tp)
        if cfg.qk_norm:  # Qwen3: one [head_dim] weight shared by every head, so replicated under TP
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, positions, slot_mapping, block_tables, k_cache, v_cache):
        """x [B, T, hidden] -> [B, T, hidden]; this step's K/V land in the cache first."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b * t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b * t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = self.v_proj(x).view(b * t, self.kv_heads, self.head_dim)
        write_kv(k_cache, self.layer, slot_mapping, k)
        write_kv(v_cache, self.layer, slot_mapping, v)
        out = paged_attention(q.view(b, t, self.heads, self.head_dim), k_cache, v_cache, self.layer,
                              block_tables, positions, self.scale)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig, tp: TPInfo):
        super().__init__()
        inner = tp.padded(cfg.intermediate_size)            # zero-padded when it does not divide
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, inner, False, tp)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, inner, False, tp)
        self.down_proj = RowParallelLinear(inner, cfg.hidden_size, False, tp)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int, tp: TPInfo):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)


class LanguageModel(nn.Module):
    """Token ids (+ image embeddings) -> last-position logits, K/V written to the paged pool."""

    def __init__(self, cfg: LLMConfig, tp: TPInfo = SINGLE, max_seq_len: int = 0):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp)
        self.rotary = rotary_embedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                                       max_seq_len or cfg.max_position_embeddings)

    def embed(self, input_ids, image_embeds=None, image_mask=None):
        x = self.embed_tokens(input_ids)
        if image_embeds is not None:
            x = torch.where(image_mask[:, None], image_embeds.to(x.dtype), x)
        return x

    def forward(self, x, positions, slot_mapping, block_tables, k_cache, v_cache):
        """x [B, T, hidden] embeddings at positions [B, T] -> final hidden states [B, T, hidden]."""
        cos, sin = self.rotary(positions, x.dtype)
        flat_slots = slot_mapping.reshape(-1)
        for layer in self.layers:
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, positions, flat_slots, block_tables,
                                    k_cache, v_cache)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def prefill(self, input_ids, positions, image_embeds, image_mask, slot_mapping, block_table, last_index,
                k_cache, v_cache):
        """One chunk of one sequence: [T] tokens -> logits [1, V] of the token at last_index."""
        x = self.embed(input_ids, image_embeds, image_mask)[None]
        h = self(x, positions[None], slot_mapping[None], block_table, k_cache, v_cache)[0]
        return self.lm_head(self.norm(h.index_select(0, last_index)))

    def decode(self, input_ids, positions, slot_mapping, block_tables, k_cache, v_cache):
        """One token for each of B sequences -> logits [B, V]."""
        x = self.embed(input_ids)[:, None]
        h = self(x, positions[:, None], slot_mapping[:, None], block_tables, k_cache, v_cache)[:, 0]
        return self.lm_head(self.norm(h))
