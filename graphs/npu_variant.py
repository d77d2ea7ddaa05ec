"""The NPU graph variant: the same graphs/ modules, calling the Ascend NPU operators.

`to_npu_variant(model, ops)` switches a built InternVL (graphs/model.py) in place, module by
module, to forwards that call `ops.<name>` where an NPU wants a fused operator:

- every RMSNorm (decoder, final norm, Qwen3's q/k norms, an InternViT-6B's norms) -> npu_rms_norm;
- the decoder's residual add + next RMSNorm -> npu_add_rms_norm (the layer loop is rewritten so
  each add feeds the following norm, as the NPU kernel wants it);
- RoPE on q and k -> npu_apply_rotary_pos_emb (layout BSND, rotary_mode "half");
- the KV-cache writes -> npu_scatter_nd_update_ on the 5-D pool (indices [N, 3]: layer, block,
  offset), in place;
- paged attention, prefill chunks and decode alike -> torchair's npu_fused_infer_attention_score
  (`torch.ops.air`, torchair.ops: torch_npu's op with the actual_seq_length arguments as int64
  tensors) with input_layout "BSH", the layer's pool viewed as [num_blocks, block_size,
  kv_heads * head_dim], block_table (int32), block_size, num_key_value_heads, sparse_mode 0 and
  the real per-step lengths, computed in the graph from its inputs (so a static .om takes them
  as data each call and FIA does not attend over the padded keys of the context bucket):
  actual_seq_lengths_kv = position of the last real token + 1 per row (decode: positions + 1;
  prefill: positions[last_index] + 1), actual_seq_lengths = last_index + 1 for a prefill chunk
  (its padded query rows are not computed). A prefill chunk also takes an atten_mask [B, 1, T,
  S] (bool, True = masked: keys past each query's position; S = max_blocks * block_size) for
  the causal order inside the chunk; decode (one query per row) needs none. torch_npu's own op
  takes the lengths as `SymInt[]`, which a dynamic=False export bakes in as constants (and
  torchair has no converter for the .tolist() that would make them data), hence torchair's;
- the SwiGLU MLP -> one gate_up linear (the gate and up weights concatenated once, here) +
  npu_swiglu.

All-reduces stay as they are: graphs/parallel.py already emits `_c10d_functional.all_reduce` +
`wait_tensor`, which torchair converts to HcomAllReduce (reference §1.9). The ViT's own attention
and LayerNorms are left as aten ops (torchair lowers them through its aten converters).

`ops` is an `npu_ops.OpSet(npu, air)`: the CPU stand-ins (`torch.ops.internvl_npu`,
`torch.ops.internvl_air`, graphs/npu_ops.py) by default; on a box with torch_npu and torchair it is
`OpSet(torch.ops.npu, torch.ops.air)` (compile/backends/npu.py), same schemas, same call sites.
Nothing here imports torch_npu or torchair.
"""
from __future__ import annotations

import torch
from torch import nn

from . import npu_ops
from .decoder import MLP, Attention, LanguageModel
from .norm import RMSNorm

npu_ops.register()


def default_ops() -> npu_ops.OpSet:
    return npu_ops.stand_ins()


class NpuRMSNorm(RMSNorm):
    def forward(self, x):
        return self._npu_ops.npu.npu_rms_norm(x, self.weight, self.eps)[0]


class NpuMLP(MLP):
    def forward(self, x):
        return self.down_proj(self._npu_ops.npu.npu_swiglu(torch.nn.functional.linear(x, self.gate_up_weight), -1))


class NpuAttention(Attention):
    def forward(self, x, cos, sin, positions, slot_mapping, block_tables, k_cache, v_cache, q_lens=None,
                kv_lens=None):
        """As Attention.forward; q_lens / kv_lens [B] int64: the real query rows and keys of each
        row (default: every query row; keys up to the largest position + 1)."""
        ops = self._npu_ops.npu
        b, t, _ = x.shape
        q = self.q_proj(x).view(b * t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b * t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        d = self.head_dim
        q, k = ops.npu_apply_rotary_pos_emb(q.view(b, t, self.heads, d), k.view(b, t, self.kv_heads, d),
                                            cos.view(b, t, 1, d), sin.view(b, t, 1, d), "BSND", "half")
        v = self.v_proj(x).view(b * t, self.kv_heads, d)
        block_size = k_cache.shape[2]
        indices = torch.stack((torch.full_like(slot_mapping, self.layer), slot_mapping // block_size,
                               slot_mapping % block_size), dim=-1)
        ops.npu_scatter_nd_update_(k_cache, indices, k.reshape(b * t, self.kv_heads, d).to(k_cache.dtype))
        ops.npu_scatter_nd_update_(v_cache, indices, v.to(v_cache.dtype))
        nb = k_cache.shape[1]
        key = k_cache[self.layer].view(nb, block_size, self.kv_heads * d)
        value = v_cache[self.layer].view(nb, block_size, self.kv_heads * d)
        if kv_lens is None:
            kv_lens = positions.amax(dim=1) + 1
        mask = None
        if t > 1:        # causal order inside a chunk; one query per row needs only the lengths
            s = block_tables.shape[1] * block_size
            mask = (torch.arange(s, device=x.device)[None, None, :] > positions[:, :, None])[:, None]   # [B,1,T,S]
        out, _ = self._npu_ops.air.npu_fused_infer_attention_score(
            q.reshape(b, t, self.heads * d), key, value, atten_mask=mask,
            actual_seq_lengths=q_lens if t > 1 else None, actual_seq_lengths_kv=kv_lens,
            block_table=block_tables.to(torch.int32), num_heads=self.heads, scale=self.scale,
            input_layout="BSH", num_key_value_heads=self.kv_heads, sparse_mode=0, block_size=block_size)
        return self.o_proj(out.to(x.dtype))


class NpuLanguageModel(LanguageModel):
    def forward(self, x, positions, slot_mapping, block_tables, k_cache, v_cache, q_lens=None, kv_lens=None):
        """As LanguageModel.forward, each residual add fused with the norm that reads it, the real
        lengths (NpuAttention) computed once for every layer."""
        ops = self._npu_ops.npu
        cos, sin = self.rotary(positions, x.dtype)
        flat_slots = slot_mapping.reshape(-1)
        if kv_lens is None:
            kv_lens = positions.amax(dim=1) + 1          # decode: positions + 1
        layers = list(self.layers)
        h = ops.npu_rms_norm(x, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)[0]
        for i, layer in enumerate(layers):
            a = layer.self_attn(h, cos, sin, positions, flat_slots, block_tables, k_cache, v_cache, q_lens, kv_lens)
            post = layer.post_attention_layernorm
            h, _, x = ops.npu_add_rms_norm(x, a, post.weight, post.eps)
            m = layer.mlp(h)
            if i + 1 < len(layers):
                nxt = layers[i + 1].input_layernorm
                h, _, x = ops.npu_add_rms_norm(x, m, nxt.weight, nxt.eps)
            else:
                x = x + m
        return x

    def prefill(self, input_ids, positions, image_embeds, image_mask, slot_mapping, block_table, last_index,
                k_cache, v_cache):
        """As LanguageModel.prefill, FIA told the chunk's real length (last_index + 1 queries) and its
        keys (up to the last real token's position + 1): the padded rows and keys are not attended."""
        x = self.embed(input_ids, image_embeds, image_mask)[None]
        q_lens = last_index + 1
        kv_lens = positions.index_select(0, last_index) + 1
        h = self(x, positions[None], slot_mapping[None], block_table, k_cache, v_cache, q_lens, kv_lens)[0]
        return self.lm_head(self.norm(h.index_select(0, last_index)))


_SWAPS = ((LanguageModel, NpuLanguageModel), (Attention, NpuAttention), (MLP, NpuMLP), (RMSNorm, NpuRMSNorm))


def to_npu_variant(model: nn.Module, ops: npu_ops.OpSet | None = None) -> nn.Module:
    """Switch `model` (an InternVL or any module holding the decoder's parts) to the NPU operators,
    in place; returns it. Idempotent. `ops`: the two operator namespaces (default the CPU stand-ins)."""
    ops = ops if ops is not None else default_ops()
    if not isinstance(ops, npu_ops.OpSet):
        raise TypeError(f"to_npu_variant takes an npu_ops.OpSet(npu, air), not {type(ops).__name__}")
    for mod in model.modules():
        for base, npu in _SWAPS:
            if type(mod) is base:
                mod.__class__ = npu
                break
        if isinstance(mod, (NpuLanguageModel, NpuAttention, NpuMLP, NpuRMSNorm)):
            mod._npu_ops = ops
        if isinstance(mod, NpuMLP) and not hasattr(mod, "gate_up_weight"):
            gate, up = mod.gate_proj.weight, mod.up_proj.weight
            mod.gate_up_weight = nn.Parameter(torch.cat((gate.detach(), up.detach()), 0), requires_grad=False)
            del mod.gate_proj, mod.up_proj
    return model


def uses_npu_ops(gm_or_ep) -> dict[str, int]:
    """Count the NPU operator calls in an FX graph / exported program, by operator name."""
    graph = gm_or_ep.graph
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_function":
            name = str(n.target)
            for op in npu_ops.SCHEMAS:
                if f".{op}." in name or name.endswith(f".{op}") or f"::{op}" in name:
                    counts[op] = counts.get(op, 0) + 1
    return counts
