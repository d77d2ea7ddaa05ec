"""Residual add + RMSNorm -> one fp32 formulation.

The decoder (and InternViT-6B) writes `x = x + delta; h = norm(x)`, and graphs/norm.py's
RMSNorm is, as export records it (the reference models' formulation):

    s = x + delta                       # model dtype: rounded
    f = s.to(fp32)
    m = f * rsqrt(mean(f ** 2, -1, keepdim) + eps)
    h = weight * m.to(dtype)            # rounded twice: m to dtype, then the product

This pass rewrites each such pair as

    sf = x + delta.to(fp32)             # the sum, once, in fp32 (x is promoted)
    s  = sf.to(dtype)                   # the residual stream: bit-identical to before
    h  = (sf * rsqrt(mean(sf * sf, -1, keepdim) + eps) * weight).to(dtype)   # fp32 math

so the residual output and the normalised output come from one fp32 sum, with one
rounding at the end instead of dtype round trips in between. In fp32 graphs the casts
vanish and the result is bit-identical; in bf16/fp16 the residual stream is unchanged
and the normalised output differs by at most about one unit in the last place (it is
computed from the exact sum and rounded once, so it is, if anything, closer to the
real-valued result).

Norms that do not follow an add (the first layer's input norm, the final norm after the
last-token select) are left as they are.

What it buys (measured with AOTInductor on CPU, torch 2.13): nothing in speed. Inductor
already turns the original add + norm into one kernel per norm (a sum-of-squares loop and
a normalise loop, the add recomputed in both, nothing stored but the output), and emits
the same structure for this form; a decode step (hidden 1024, 4 layers, fp32 and bf16)
timed the same within noise. It is kept for the single rounding, and as the one place
where a backend with a fused add-RMSNorm kernel can pick the pattern up. Op count: -2
per pair in fp32 graphs, +1 in bf16 graphs (explicit casts replace implicit ones).
"""
from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from .program_edit import (ProgramEditor, aten, cast_dtype, input_fqn, input_specs_by_name, is_op, real_users,
                           val)

FP32 = torch.float32


def count(ep: ExportedProgram) -> int:
    """How many residual-add + RMSNorm pairs of the original form the program has."""
    specs = input_specs_by_name(ep)
    return sum(1 for n in ep.graph.nodes if _match(specs, n) is not None)


def apply(ep: ExportedProgram) -> tuple[ExportedProgram, dict]:
    ed = ProgramEditor(ep)
    pows = [n for n in ed.graph.nodes if is_op(n, aten.pow.Tensor_Scalar)]
    fused = 0
    for p in pows:
        match = _match(ed.specs, p)
        if match is not None:
            _rewrite(ed, **match)
            fused += 1
    out = ed.finish() if fused else ep
    left = sum(1 for n in out.graph.nodes if is_op(n, aten.rsqrt.default)) - fused
    return out, {"fused": fused, "norms_left": left}


def _only_user(node, target):
    users = real_users(node)
    if len(users) != 1 or not is_op(users[0], target):
        return None
    return users[0]


def _match(specs, p) -> dict | None:
    """pow(f, 2) -> mean -> add eps -> rsqrt -> f * r -> [to dtype] -> weight * (.), f = to_fp32(x + delta)."""
    if not is_op(p, aten.pow.Tensor_Scalar) or p.args[1] != 2:
        return None
    f = p.args[0]
    mean = _only_user(p, aten.mean.dim)
    if mean is None or mean.args[0] is not p or len(mean.args) < 3 or mean.args[2] is not True:
        return None
    ndim = val(f).dim()
    if [d % ndim for d in mean.args[1]] != [ndim - 1] or mean.kwargs.get("dtype") is not None:
        return None
    add_eps = _only_user(mean, aten.add.Tensor)
    if add_eps is None or add_eps.args[0] is not mean or not isinstance(add_eps.args[1], (int, float)):
        return None
    rsqrt = _only_user(add_eps, aten.rsqrt.default)
    mul = rsqrt and _only_user(rsqrt, aten.mul.Tensor)
    if mul is None or set(mul.args) != {f, rsqrt}:
        return None
    head = mul
    cast = real_users(mul)
    if len(cast) == 1 and cast_dtype(cast[0]) is not None:
        head = cast[0]
    scale = _only_user(head, aten.mul.Tensor)
    if scale is None or len(scale.args) != 2:
        return None
    weight = next((a for a in scale.args if a is not head), None)
    if input_fqn(specs, weight, InputKind.PARAMETER, InputKind.BUFFER) is None or val(weight).dim() != 1:
        return None
    # f = s.to(fp32) (or s itself when the norm has no cast), s = x + delta, all of one dtype.
    s = f.args[0] if cast_dtype(f) == FP32 else f
    if not is_op(s, aten.add.Tensor) or s.kwargs or len(s.args) != 2:
        return None
    x, delta = s.args
    vs, vx, vd = val(s), val(x), val(delta)
    if not all(isinstance(v, torch.Tensor) for v in (vs, vx, vd)):
        return None
    if vx.dtype != vs.dtype or vd.dtype != vs.dtype:   # broadcasting is fine (ViT: + position_embedding)
        return None
    if val(f).dtype != FP32 or not vs.dtype.is_floating_point:
        return None
    return dict(s=s, f=f, eps=add_eps.args[1], weight=weight, out=scale, out_dtype=val(scale).dtype)


def _rewrite(ed: ProgramEditor, s, f, eps, weight, out, out_dtype) -> None:
    x, delta = s.args
    dtype = val(s).dtype
    with ed.graph.inserting_before(s.next):
        # Type promotion does the other up-casts: x + fp32 delta and fp32 * weight are exact fp32 ops.
        if dtype == FP32:
            sf = s_new = ed.call(aten.add.Tensor, (x, delta), like=s)
        else:
            sf = ed.call(aten.add.Tensor, (x, ed.call(aten.to.dtype, (delta, FP32), like=s)), like=s)
            s_new = ed.call(aten.to.dtype, (sf, dtype), like=s)
        sq = ed.call(aten.mul.Tensor, (sf, sf), like=out)
        ms = ed.call(aten.mean.dim, (sq, [-1], True), like=out)
        r = ed.call(aten.rsqrt.default, (ed.call(aten.add.Tensor, (ms, eps), like=out),), like=out)
        h = ed.call(aten.mul.Tensor, (ed.call(aten.mul.Tensor, (sf, r), like=out), weight), like=out)
        if val(h).dtype != out_dtype:
            h = ed.call(aten.to.dtype, (h, out_dtype), like=out)
    out.replace_all_uses_with(h)
    # The residual stream reads the new sum. Whatever else read `f` (in fp32 graphs export
    # routes the next residual add through the no-op cast) now reads f = s_new.to(fp32):
    # the same values as before. The norm's own nodes die with `out`.
    s.replace_all_uses_with(s_new)
    if dtype == FP32 and f is not s:
        f.replace_all_uses_with(sf)
