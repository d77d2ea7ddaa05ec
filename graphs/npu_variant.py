"""The NPU graph variant: the same graphs/ modules, calling the Ascend NPU operators.

`to_npu_variant(model, ops)` switches a built InternVL (graphs/model.py) in place, module by
module, to forwards that call `ops.<name>` where an NPU wants a fused operator:

- every RMSNorm (decoder, final norm, Qwen3's q/k norms, an InternViT-6B's norms) -> npu_rms_norm;
- the decoder's residual add + next RMSNorm -> npu_add_rms_norm (the layer loop is rewritten so
  each add feeds the following norm, as the NPU kernel wants it);
- RoPE on q and k -> npu_apply_rotary_pos_emb (layout BSND, rotary_mode "half");
- the KV-cache writes -> npu_scatter_nd_update_ on the 5-D pool (indices [N, 3]: layer, block,
  offset), in place;
- paged attention, prefill chunks and decode alike -> npu_fused_infer_attention_score with
  input_layout "BSH", the layer's pool viewed as [num_blocks, block_size, kv_heads * head_dim],
  block_table (int32), block_size, num_key_value_heads, sparse_mode 0, an atten_mask
  [B, 1, T, S] (bool, True = masked: keys past each query's position; S = max_blocks *
  block_size) and actual_seq_lengths_kv = [S] * B (static; the mask carries the real lengths,
  so a graph has no data-dependent int list);
- the SwiGLU MLP -> one gate_up linear (the gate and up weights concatenated once, here) +
  npu_swiglu.

All-reduces stay as they are: graphs/parallel.py already emits `_c10d_functional.all_reduce` +
`wait_tensor`, which torchair converts to HcomAllReduce (reference §1.9). The ViT's own attention
and LayerNorms are left as aten ops (torchair lowers them through its aten converters).

`ops` is `torch.ops.internvl_npu` (the CPU stand-ins, graphs/npu_ops.py) by default; on a box with
torch_npu it is `torch.ops.npu` (compile/backends/npu.py), same schemas, same call sites. Nothing
here imports torch_npu.
"""
from __future__ import annotations

import torch
from torch import nn

from . import npu_ops
from .decoder import MLP, Attention, LanguageModel
from .norm import RMSNorm

npu_ops.register()


def default_ops():
    return getattr(torch.ops, npu_ops.NAMESPACE)


class NpuRMSNorm(RMSNorm):
    def forward(self, x):
        return self._npu_ops.npu_rms_norm(x, self.weight, self.eps)[0]


class NpuMLP(MLP):
    def forward(self, x):
        return self.down_proj(self._npu_ops.npu_swiglu(torch.nn.functional.linear(x, self.gate_up_weight), -1))


class NpuAttention(Attention):
    def forward(self, x, cos, sin, positions, slot_mapping, block_tables, k_cache, v_cache):
        ops = self._npu_ops
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
        s = block_tables.shape[1] * block_size
        mask = (torch.arange(s, device=x.device)[None, None, :] > positions[:, :, None])[:, None]   # [B, 1, T, S]
        out, _ = ops.npu_fused_infer_attention_score(
            q.reshape(b, t, self.heads * d), key, value, atten_mask=mask, actual_seq_lengths_kv=[s] * b,
            block_table=block_tables.to(torch.int32), num_heads=self.heads, scale=self.scale,
            input_layout="BSH", num_key_value_heads=self.kv_heads, sparse_mode=0, block_size=block_size)
        return self.o_proj(out.to(x.dtype))


class NpuLanguageModel(LanguageModel):
    def forward(self, x, positions, slot_mapping, block_tables, k_cache, v_cache):
        """As LanguageModel.forward, each residual add fused with the norm that reads it."""
        ops = self._npu_ops
        cos, sin = self.rotary(positions, x.dtype)
        flat_slots = slot_mapping.reshape(-1)
        layers = list(self.layers)
        h = ops.npu_rms_norm(x, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)[0]
        for i, layer in enumerate(layers):
            a = layer.self_attn(h, cos, sin, positions, flat_slots, block_tables, k_cache, v_cache)
            post = layer.post_attention_layernorm
            h, _, x = ops.npu_add_rms_norm(x, a, post.weight, post.eps)
            m = layer.mlp(h)
            if i + 1 < len(layers):
                nxt = layers[i + 1].input_layernorm
                h, _, x = ops.npu_add_rms_norm(x, m, nxt.weight, nxt.eps)
            else:
                x = x + m
        return x


_SWAPS = ((LanguageModel, NpuLanguageModel), (Attention, NpuAttention), (MLP, NpuMLP), (RMSNorm, NpuRMSNorm))


def to_npu_variant(model: nn.Module, ops=None) -> nn.Module:
    """Switch `model` (an InternVL or any module holding the decoder's parts) to the NPU operators,
    in place; returns it. Idempotent. `ops`: the operator namespace (default the CPU stand-ins)."""
    ops = ops if ops is not None else default_ops()
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
