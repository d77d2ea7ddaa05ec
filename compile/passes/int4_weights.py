"""Weight-only group-wise int4 (`QUANT=int4`): the LLM's linear weights as 4-bit integers with an fp32 scale per
group of GROUP (128) weights of a row.

Decode reads every weight once per step: int4 is a quarter of the bf16 bytes (plus 4 bytes of scale per 128
weights: 0.53 bytes a weight against int8's 1.0). For each linear of the language model (int8_weights' scope) the
weight `W [N, K]` becomes

    s[n, g] = max |W[n, g*GROUP : (g+1)*GROUP]| / 7 (fp32),   v = round(W / s) in [-7, 7] (symmetric, round to nearest)

packed two to a byte (uint8 [N, K / 2]): each 64-weight chunk of a row is 32 bytes, byte j holding v + 8 of
weight j in its low nibble and of weight 32 + j in its high nibble (docs/CONTRACTS.md; the layout lets a vector
unit turn 32 bytes into 64 weights in order with one shift, one mask and table lookups). The group is the `group`
option (128) where it divides K, else 64 where that does (the demo model's 192-wide LLM); other matrices stay in the
artifact's dtype. Lowered by rows:
- bf16 CPU linears of up to kernels.MAX_ROWS (8) rows where the target has the kernel library (kernels.min_rows(
  target): AVX512-BF16 or AVX2 + FMA, no AMX): `internvl::small_m_linear_int4(x, q, s, group, b)`,
  which widens the nibbles in registers once for all rows and scales each group's partial sum.
- More than kernels.MAX_ROWS rows (prefill chunks) of bf16 activations on a target without native bf16, or any rows
  of fp32 activations on any target with AVX2 + FMA: `internvl::linear_fp32_int4(x, q, s, group, b)` (kernels/fp32_gemm.cpp,
  the nibbles dequantised to fp32 as they are packed; kernels.gemm_takes).
- Everything else (prefill chunks, larger batches, other targets) dequantises slices of output
  rows right before their GEMM (int8_weights' sliced GEMM, in fp32 on a target without native bf16): through the
  kernel library's `internvl::dequant_int4` where the `kernel` option allows the library, else as graph ops (which
  Inductor compiled to ~0.4 G weights/s: +1.9 s on a 2B prefill chunk).

One quantised copy per weight is shared by every graph (TensorCache), as for int8. Round to nearest, no
calibration (GPTQ/AWQ-style error compensation would change the scales, not the format or the kernels).
"""
from __future__ import annotations

import torch
from torch.export import ExportedProgram

from ... import kernels
from ..targets import current
from .int8_weights import GEMM_SMALL_ROWS, SCOPE, _sliced_gemm, scoped_linears
from .program_edit import ProgramEditor, TensorCache, aten, linear_bias, val, rows as _rows

GROUP = 128
CHUNK = 64           # weights per 32 bytes of the packed layout
QMAX = 7
_QUANTIZED = TensorCache()


def quantize(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q uint8 [N, K / 2] in the packed layout, s fp32 [N, K / group]) with w ~= dequantize(q, s, group)."""
    n, k = w.shape
    if group % CHUNK or k % group:
        raise ValueError(f"int4 groups of {group} need K a multiple of {group} and group a multiple of {CHUNK}: "
                         f"got K = {k}")
    g = w.detach().float().reshape(n, k // group, group)
    s = (g.abs().amax(dim=2) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    v = (torch.round(g / s[..., None]).clamp(-QMAX, QMAX) + 8).to(torch.uint8).reshape(n, k // CHUNK, CHUNK)
    q = v[..., :CHUNK // 2] | (v[..., CHUNK // 2:] << 4)
    return q.reshape(n, k // 2).contiguous(), s.contiguous()


def dequantize(q: torch.Tensor, s: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """fp32 [N, K] from quantize's (q, s): the weights an int4 artifact computes with."""
    n, k = q.shape[0], 2 * q.shape[1]
    b = q.reshape(n, k // CHUNK, CHUNK // 2)
    v = torch.cat([b & 0x0F, b >> 4], dim=2).float() - 8
    return (v.reshape(n, k // group, group) * s[..., None]).reshape(n, k)


def apply(ep: ExportedProgram, scope: str = SCOPE, group: int = GROUP, chunk_mb: float = 8.0,
          small_chunk_mb: float = 2.0, native_bf16: bool | None = None,
          kernel: bool | None = None) -> tuple[ExportedProgram, dict]:
    """native_bf16 (default: the compile target's): without it the dequantised GEMMs of bf16/fp16 graphs run in
    fp32 (fp32_gemm.py). kernel: bf16 linears of up to kernels.MAX_ROWS rows call internvl::small_m_linear_int4
    (None: the target decides; True: from 1 row on any target, for tests; False: never), and those over more rows
    of a bf16 graph without native bf16 or of an fp32 graph (any rows) internvl::linear_fp32_int4 (kernels.gemm_takes)."""
    if native_bf16 is None:
        native_bf16 = current().native_bf16
    least = kernels.least_rows(kernel, current())
    ed = ProgramEditor(ep)
    done, kept, q_bytes, src_bytes, sliced, by_kernel, groups, by_op, by_gemm = [], [], 0, 0, 0, 0, {}, 0, 0
    for node, w_node, fqn, w in scoped_linears(ed, scope):
        g = next((c for c in (group, CHUNK) if w.shape[1] % c == 0), None)
        if g is None:
            kept.append(fqn)
            continue
        base = fqn[: -len(".weight")]
        q, scale = _QUANTIZED.get(base, [w], lambda w=w: tuple(
            torch.nn.Parameter(t, requires_grad=False) for t in quantize(w, g)), extra_key=(g,))
        x = node.args[0]
        q_in = ed.add_parameter(f"{base}.weight_int4", q, before=w_node)
        s_in = ed.add_parameter(f"{base}.weight_scale_g{g}", scale, before=w_node)
        rows = _rows(val(x))
        b = linear_bias(node)
        if kernels.takes(least, val(x), rows, None if b is None else val(b)):
            ed.replace(node, lambda: ed.call(kernels.op("small_m_linear_int4", current()), (x, q_in, s_in, g, b),
                                             like=node))
            by_kernel += 1
        elif kernels.gemm_takes(kernel, current(), native_bf16, val(x), rows, quantized=True):
            ed.replace(node, lambda: ed.call(kernels.op("linear_fp32_int4", current()), (x, q_in, s_in, g, b),
                                             like=node))
            by_gemm += 1
        else:
            op = least is not None and val(x).device.type == "cpu"
            deq = _dequant_op if op else _dequant
            ed.replace(node, lambda: _sliced_gemm(ed, node, q_in, s_in,
                                                  small_chunk_mb if rows <= GEMM_SMALL_ROWS else chunk_mb,
                                                  wide=not native_bf16, dequant=lambda *a: deq(*a, group=g)))
            sliced += 1
            by_op += op
        ed.drop_input_if_unused(w_node)
        done.append(fqn)
        groups[g] = groups.get(g, 0) + 1
        q_bytes += q.numel() + 4 * scale.numel()
        src_bytes += w.numel() * w.element_size()
    report = {"quantized": len(done), "kept": len(kept), "gemm_sliced": sliced, "dequant_op": by_op, "kernel": by_kernel,
              "gemm_kernel": by_gemm,
              "group": group, "groups": {str(k): n for k, n in sorted(groups.items())}, "scope": scope, "bytes": [src_bytes, q_bytes]}
    if not done:
        return ep, report
    report["example"] = done[0]
    return ed.finish(), report


def _dequant_op(ed: ProgramEditor, node, q, s, dtype, group: int):
    """internvl::dequant_int4 over (a row slice of) q and s, in bf16 or fp32 (other dtypes: cast from fp32)."""
    w = ed.call(kernels.op("dequant_int4", current()), (q, s, group, dtype != torch.bfloat16), like=node)
    return w if dtype in (torch.bfloat16, torch.float32) else ed.call(aten._to_copy.default, (w,), {"dtype": dtype},
                                                                      like=node)


def _dequant(ed: ProgramEditor, node, q, s, dtype, group: int):
    """dequantize() as graph ops over (a row slice of) q and s, cast to dtype."""
    n, half = val(q).shape
    k = 2 * half
    b = ed.call(aten.reshape.default, (q, [n, k // CHUNK, CHUNK // 2]), like=node)
    lo = ed.call(aten.bitwise_and.Scalar, (b, 0x0F), like=node)
    hi = ed.call(aten.bitwise_right_shift.Tensor_Scalar, (b, 4), like=node)
    v = ed.call(aten.cat.default, ([lo, hi], 2), like=node)
    v = ed.call(aten._to_copy.default, (v,), {"dtype": torch.float32}, like=node)
    v = ed.call(aten.sub.Tensor, (v, 8), like=node)
    v = ed.call(aten.reshape.default, (v, [n, k // group, group]), like=node)
    v = ed.call(aten.mul.Tensor, (v, ed.call(aten.unsqueeze.default, (s, 2), like=node)), like=node)
    v = ed.call(aten.reshape.default, (v, [n, k]), like=node)
    return v if dtype == torch.float32 else ed.call(aten._to_copy.default, (v,), {"dtype": dtype}, like=node)
