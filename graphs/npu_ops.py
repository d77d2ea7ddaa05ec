"""CPU stand-ins for the Ascend NPU operators the NPU graph variant calls (graphs/npu_variant.py).

Registered as custom operators under their own namespaces with the schemas of the real ones:
`torch.ops.internvl_npu.*` with torch_npu's (`torch.ops.npu.*`, Ascend/op-plugin
`op_plugin_functions.yaml`; the facts and their sources: shared/reference/npu-torchair.md §1.8),
and `torch.ops.internvl_air.npu_fused_infer_attention_score` with torchair's graph-mode variant
(`torch.ops.air.*`, Ascend/torchair python/torchair/ops/_npu_fused_infer_attention_score.py,
exposed as `torchair.ops.npu_fused_infer_attention_score`), which takes actual_seq_lengths /
actual_seq_lengths_kv as int64 *tensors* where torch_npu's takes `SymInt[]`. A graph written
against them has the same call sites as one written against the real ops:
`npu_variant.to_npu_variant(model, OpSet(torch.ops.npu, torch.ops.air))` builds the graph
torchair converts. The CPU kernels are written from the
documented semantics in plain PyTorch; they are for tests and for running the NPU variant on a
CPU, never for speed. None of them was checked against a real NPU kernel by us.

Semantics implemented (and what is not):
- npu_fused_infer_attention_score: input_layout "BSH" and "BNSD"; paged K/V through
  `block_table` ([B, max_blocks] int32; key/value then [num_blocks, block_size, kv_heads*d] in
  BSH or [num_blocks, kv_heads, block_size, d] in BNSD); GQA through num_key_value_heads;
  `atten_mask` (bool/int8/uint8, 1 = masked out, broadcast from [B, 1, Sq, Skv], [B, Sq, Skv]
  or [Sq, Skv]) with sparse_mode=0; `actual_seq_lengths_kv` (keys past a sequence's length are
  masked) and `actual_seq_lengths` (query rows past a sequence's length are not computed: the
  stand-in writes zeros there; what the NPU kernel leaves there is not documented, so a graph
  must not read those rows), as int lists (torch_npu's op) or int64 tensors (torchair's). Quantisation, pse_shift, shared prefixes, rope split, pre/next_tokens windows and
  the other sparse modes are refused (NotImplementedError), not approximated. softmax_lse is
  returned as a [1] zero tensor unless softmax_lse_flag (then the real log-sum-exp, fp32).
- npu_scatter_nd_update_ / npu_scatter_nd_update: self[indices[i]] = updates[i], indices
  [N, k] addressing the first k dims. The in-place op is CompositeImplicitAutograd over the
  functional one + copy_, as torch_npu's functionalization pairs them, so it passes
  functionalization (torch.export, aot_eager) with the cache written in place.
- npu_rms_norm(x, gamma, eps) -> (y, rstd): fp32 statistics, y = x * rstd * gamma cast to x's dtype.
- npu_add_rms_norm(x1, x2, gamma, eps) -> (y, rstd, x1 + x2).
- npu_apply_rotary_pos_emb(q, k, cos, sin, layout, rotary_mode="half"): rotate-half RoPE,
  layout "BSND" (cos/sin [B, S, 1, D]). The NPU kernel writes q/k in place and returns them
  (torchair's converter warns about it); the stand-in returns new tensors. The variant only
  uses the returned values, so both behave the same there.
- npu_swiglu(x, dim=-1): a, b = x.chunk(2, dim); silu(a) * b.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

NAMESPACE = "internvl_npu"          # stands in for torch.ops.npu (torch_npu)
AIR_NAMESPACE = "internvl_air"      # stands in for torch.ops.air (torchair.ops, graph mode only)

_FIA_SCHEMA = (
    "npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, "
    "Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, "
    "Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None, "
    "Tensor? quant_scale2=None, Tensor? quant_offset2=None, Tensor? antiquant_scale=None, "
    "Tensor? antiquant_offset=None, Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, "
    "Tensor? value_antiquant_scale=None, Tensor? value_antiquant_offset=None, Tensor? block_table=None, "
    "Tensor? query_padding_size=None, Tensor? kv_padding_size=None, Tensor? key_shared_prefix=None, "
    "Tensor? value_shared_prefix=None, SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, "
    "Tensor? key_rope=None, Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, "
    "int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout=\"BSH\", "
    "int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0, "
    "int antiquant_mode=0, int key_antiquant_mode=0, int value_antiquant_mode=0, "
    "bool softmax_lse_flag=False) -> (Tensor, Tensor)")

# torchair.ops' variant: the same op with the actual_seq_length arguments as tensors, so a static
# graph takes the per-step lengths as data (a SymInt[] would be baked into a dynamic=False export,
# and torchair has no GE converter for the .tolist()/item() that would turn a tensor into one).
_AIR_FIA_SCHEMA = (_FIA_SCHEMA.replace("SymInt[]? actual_seq_lengths=None", "Tensor? actual_seq_lengths=None")
                   .replace("SymInt[]? actual_seq_lengths_kv=None", "Tensor? actual_seq_lengths_kv=None")
                   .replace("SymInt[]? actual_shared_prefix_len=None", "Tensor? actual_shared_prefix_len=None"))
AIR_SCHEMAS = {"npu_fused_infer_attention_score": _AIR_FIA_SCHEMA}

SCHEMAS = {
    "npu_fused_infer_attention_score": _FIA_SCHEMA,
    "npu_scatter_nd_update_": "npu_scatter_nd_update_(Tensor(a!) self, Tensor indices, Tensor updates) -> Tensor(a!)",
    "npu_scatter_nd_update": "npu_scatter_nd_update(Tensor self, Tensor indices, Tensor updates) -> Tensor",
    "npu_rms_norm": "npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    "npu_add_rms_norm": "npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) "
                        "-> (Tensor, Tensor, Tensor)",
    "npu_apply_rotary_pos_emb": "npu_apply_rotary_pos_emb(Tensor query, Tensor key, Tensor cos, Tensor sin, "
                                "str layout='BSND', str rotary_mode='half') -> (Tensor, Tensor)",
    "npu_swiglu": "npu_swiglu(Tensor self, int dim=-1) -> Tensor",
}

_UNSUPPORTED_FIA = ("pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
                    "antiquant_scale", "antiquant_offset", "key_antiquant_scale", "key_antiquant_offset",
                    "value_antiquant_scale", "value_antiquant_offset", "query_padding_size", "kv_padding_size",
                    "key_shared_prefix", "value_shared_prefix", "actual_shared_prefix_len", "query_rope",
                    "key_rope", "key_rope_antiquant_scale")


# ------------------------------------------------------------------ attention

def _fia_shapes(query, key, num_heads, num_key_value_heads, input_layout, block_table, block_size):
    """-> (B, Sq, heads, kv_heads, d, Skv)."""
    if input_layout == "BSH":
        b, sq, hd = query.shape
        d = hd // num_heads
    elif input_layout == "BNSD":
        b, _, sq, d = query.shape
    else:
        raise NotImplementedError(f"npu_fused_infer_attention_score stand-in: input_layout {input_layout!r} "
                                  "(BSH and BNSD only)")
    kvh = num_key_value_heads or num_heads
    if block_table is not None:
        skv = block_table.shape[1] * (block_size or key.shape[1 if input_layout == "BSH" else 2])
    else:
        skv = key.shape[1] if input_layout == "BSH" else key.shape[2]
    return b, sq, num_heads, kvh, d, skv


def _lengths(x, device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.long) if isinstance(x, torch.Tensor) else torch.tensor(list(x), device=device)


def _fia_cpu(query, key, value, *, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
             block_table=None,
             num_heads=1, scale=1.0, pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
             num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0, softmax_lse_flag=False,
             **rest):
    used = [k for k in _UNSUPPORTED_FIA if rest.get(k) is not None]
    if used or sparse_mode != 0 or pre_tokens != 2147483647 or next_tokens != 2147483647 or any(
            rest.get(k, 0) for k in ("antiquant_mode", "key_antiquant_mode", "value_antiquant_mode")):
        raise NotImplementedError(f"npu_fused_infer_attention_score stand-in: unsupported arguments {used}, "
                                  f"sparse_mode={sparse_mode}, pre/next_tokens={pre_tokens}/{next_tokens}")
    b, sq, h, kvh, d, skv = _fia_shapes(query, key, num_heads, num_key_value_heads, input_layout, block_table,
                                        block_size)
    g = h // kvh
    q = query.view(b, sq, h, d) if input_layout == "BSH" else query.transpose(1, 2)
    if block_table is not None:
        bt = block_table.long()
        if input_layout == "BSH":
            k = key[bt].reshape(b, skv, kvh, d)                    # [nb, bs, kvh*d] -> [B, Skv, kvh, d]
            v = value[bt].reshape(b, skv, kvh, d)
        else:
            k = key[bt].permute(0, 1, 3, 2, 4).reshape(b, skv, kvh, d)   # [nb, kvh, bs, d]
            v = value[bt].permute(0, 1, 3, 2, 4).reshape(b, skv, kvh, d)
    elif input_layout == "BSH":
        k, v = key.view(b, skv, kvh, d), value.view(b, skv, kvh, d)
    else:
        k, v = key.transpose(1, 2), value.transpose(1, 2)
    qg = q.reshape(b, sq, kvh, g, d).float()
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.float()) * scale        # [B, kvh, g, Sq, Skv]
    hidden = torch.zeros(b, 1, 1, sq, skv, dtype=torch.bool, device=query.device)
    if atten_mask is not None:
        m = atten_mask.bool()
        m = m.view(1, 1, 1, sq, skv) if m.dim() == 2 else m.reshape(m.shape[0], 1, 1, sq, skv) \
            if m.dim() == 3 or m.shape[1] == 1 else m.reshape(b, kvh, g, sq, skv)
        hidden = hidden | m
    if actual_seq_lengths_kv is not None:
        lens = _lengths(actual_seq_lengths_kv, query.device)
        hidden = hidden | (torch.arange(skv, device=query.device)[None, :] >= lens[:, None]).view(b, 1, 1, 1, skv)
    rows = None
    if actual_seq_lengths is not None:
        q_lens = _lengths(actual_seq_lengths, query.device)
        rows = (torch.arange(sq, device=query.device)[None, :] < q_lens[:, None]).view(b, 1, 1, sq, 1)
        hidden = hidden & rows                  # rows not computed: no -inf-only softmax there
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if rows is not None:
        probs = probs * rows
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.float()).to(query.dtype)   # [B, Sq, kvh, g, d]
    out = out.reshape(b, sq, h * d) if input_layout == "BSH" else out.reshape(b, sq, h, d).transpose(1, 2)
    if softmax_lse_flag:
        lse = torch.logsumexp(scores, dim=-1).reshape(b, h, sq, 1)
    else:
        lse = torch.zeros(1, dtype=torch.float32, device=query.device)
    return out.contiguous(), lse


def _fia_fake(query, key, value, *, num_heads=1, input_layout="BSH", softmax_lse_flag=False, **kw):
    if softmax_lse_flag:
        b, sq = (query.shape[0], query.shape[1]) if input_layout == "BSH" else (query.shape[0], query.shape[2])
        lse = query.new_empty((b, num_heads, sq, 1), dtype=torch.float32)
    else:
        lse = query.new_empty((1,), dtype=torch.float32)
    return torch.empty_like(query), lse


# ------------------------------------------------------------------ the rest

def _scatter_nd_update_cpu(self, indices, updates):
    idx = tuple(indices.long().unbind(-1))
    return self.index_put(idx, updates.to(self.dtype))


def _scatter_nd_update_inplace(self, indices, updates):
    return self.copy_(torch.ops.internvl_npu.npu_scatter_nd_update(self, indices, updates))


def _rms_norm_cpu(x, gamma, epsilon=1e-6):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def _rms_norm_fake(x, gamma, epsilon=1e-6):
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _add_rms_norm_cpu(x1, x2, gamma, epsilon=1e-6):
    x = x1 + x2
    y, rstd = _rms_norm_cpu(x, gamma, epsilon)
    return y, rstd, x


def _add_rms_norm_fake(x1, x2, gamma, epsilon=1e-6):
    return torch.empty_like(x1), x1.new_empty((*x1.shape[:-1], 1), dtype=torch.float32), torch.empty_like(x1)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_cpu(query, key, cos, sin, layout="BSND", rotary_mode="half"):
    if layout != "BSND" or rotary_mode != "half":
        raise NotImplementedError(f"npu_apply_rotary_pos_emb stand-in: layout {layout!r}, rotary_mode "
                                  f"{rotary_mode!r} (BSND + half only)")
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _swiglu_cpu(x, dim=-1):
    a, b = x.chunk(2, dim=dim)
    return F.silu(a) * b


def _swiglu_fake(x, dim=-1):
    shape = list(x.shape)
    shape[dim] //= 2
    return x.new_empty(shape)


_LIB = None
_AIR_LIB = None


def register() -> None:
    """Define the stand-ins once per process (idempotent; importing graphs.npu_variant calls it)."""
    global _LIB, _AIR_LIB
    if _LIB is not None or hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE),
                                                                     "npu_swiglu"):
        return
    air = torch.library.Library(AIR_NAMESPACE, "DEF")
    air.define(_AIR_FIA_SCHEMA)
    air.impl("npu_fused_infer_attention_score", _fia_cpu, "CPU")
    torch.library.register_fake(f"{AIR_NAMESPACE}::npu_fused_infer_attention_score", _fia_fake, lib=air)
    _AIR_LIB = air
    lib = torch.library.Library(NAMESPACE, "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)
    cpu = {"npu_fused_infer_attention_score": _fia_cpu, "npu_scatter_nd_update": _scatter_nd_update_cpu,
           "npu_rms_norm": _rms_norm_cpu, "npu_add_rms_norm": _add_rms_norm_cpu,
           "npu_apply_rotary_pos_emb": _apply_rotary_cpu, "npu_swiglu": _swiglu_cpu}
    for name, fn in cpu.items():
        lib.impl(name, fn, "CPU")
    lib.impl("npu_scatter_nd_update_", _scatter_nd_update_inplace, "CompositeImplicitAutograd")
    fakes = {"npu_fused_infer_attention_score": _fia_fake,
             "npu_scatter_nd_update": lambda s, i, u: torch.empty_like(s),
             "npu_rms_norm": _rms_norm_fake, "npu_add_rms_norm": _add_rms_norm_fake,
             "npu_apply_rotary_pos_emb": lambda q, k, c, s, layout="BSND", rotary_mode="half":
                 (torch.empty_like(q), torch.empty_like(k)),
             "npu_swiglu": _swiglu_fake}
    for name, fn in fakes.items():
        torch.library.register_fake(f"{NAMESPACE}::{name}", fn, lib=lib)
    _LIB = lib


class OpSet(NamedTuple):
    """The two operator namespaces the NPU variant calls: torch_npu's (`npu`) and torchair's (`air`)."""
    npu: object
    air: object


def stand_ins() -> OpSet:
    register()
    return OpSet(getattr(torch.ops, NAMESPACE), getattr(torch.ops, AIR_NAMESPACE))


register()
