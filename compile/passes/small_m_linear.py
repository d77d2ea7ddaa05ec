"""Decode GEMV lowering: a linear over one row becomes multiply + sum with fp32 accumulation.

A batch-1 decode step multiplies every weight matrix by one token row, so it is bound by
reading the weights. On CPU, oneDNN's bf16 GEMV reads them far below the memory bandwidth,
while an Inductor-generated reduction over `x.float() * w.float()` streams each weight row
once, converting bf16 to fp32 in registers. Measured (build/gemv_micro*.py, AOTInductor, 1 thread,
2-core EPYC with AVX512-BF16, InternLM2-1.8B shapes, ms per call, linear -> multiply+sum):
qkv 2.21 -> 0.96, o 1.15 -> 0.65, gate_up 7.81 -> 4.71, down 4.80 -> 3.02. At 2+ rows the
same reduction re-reads or recomputes per row and loses to the GEMM (M=2: even, M=4: 1.7x
slower), hence `max_rows=1`: the batch-1 decode graphs and the prefill graphs' output head.

Inductor sums reductions longer than 4,096 elements with a cascade helper (for accuracy) that
halved the speed of the K=8,192 `down` projection, so K is split into equal chunks of at most
`max_chunk` summed in two steps. For CPU graphs in bf16/fp16, `aten.linear(x, w, b)` becomes

    sum(sum(x.float().view(.., c, K/c)[..., None, :, :] * w.float().view(N, c, K/c), -1), -1)
    (+ b.float()), cast back to x's dtype

The weights stay where they are (no re-layout), so every graph still binds the same tensors.

On a target with AVX512-BF16 and no AMX (`kernel=None`: the compile target decides) bf16 linears of up to 8 rows
(batch-1..8 decode, the prefill head) call `internvl::small_m_linear` instead, a hand-written kernel
compiled into the artifact (kernels/: vdpbf16ps, each weight row read once for all rows); on an AVX2
target too (its fp32 FMA loop; kernels.min_rows). Measured on a
2-core Zen 4 (AVX512-BF16, no AMX), eager, 24 layers of InternLM2-1.8B matrices, GB/s of weights read at
M = 1 / 2 / 4 / 8: oneDNN 16.9 / 17.7 / 14.6 / 15.5, the kernel 27.0 / 25.3 / 19.7 / 17.5, Inductor's
reduction about 24 at M = 1 (docs/performance.md, fourth round).
"""
from __future__ import annotations

import math

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
from torch.export import ExportedProgram

from ... import kernels
from ..targets import current
from .int8_weights import DECODE_ROWS, dequantized
from .program_edit import ProgramEditor, aten, is_op, linear_bias, val, rows as _rows

LOW_PRECISION = (torch.bfloat16, torch.float16)
FORCE_STRIDES = torch.ops.prims.inductor_force_stride_order.default   # realize with this layout


def contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(list(shape)):
        strides.insert(0, step)
        step *= int(size)
    return strides


def chunk_major_strides(lead: list[int], n: int, c: int) -> list[int]:
    """Strides of a [*lead, n, c] tensor laid out as [*lead, c, n]."""
    return contiguous_strides(lead + [c, n])[:-2] + [1, n]


def apply(ep: ExportedProgram, max_rows: int = 1, max_chunk: int = 4096,
          max_rows_int8: int = DECODE_ROWS, kernel: bool | None = None) -> tuple[ExportedProgram, dict]:
    """max_rows: the most rows a bf16/fp16 linear is lowered to the reduction at; max_rows_int8: the
    same for int8 weights (int8_weights' dequantisation), at any activation dtype: without the
    lowering they would write a dequantised copy of the matrix every step. kernel: bf16 linears of
    up to kernels.MAX_ROWS rows call internvl::small_m_linear (None: the target decides,
    kernels.min_rows: AVX512-BF16 and AVX2 + FMA from 1 row; True: from 1 row on any target,
    for tests; False: never)."""
    least = kernels.least_rows(kernel, current())      # fewest rows at the kernel, None: never
    ed = ProgramEditor(ep)
    lowered, kept, int8, by_kernel = 0, 0, 0, 0
    for node in list(ed.graph.nodes):
        if not is_op(node, aten.linear.default):
            continue
        x, w = node.args[0], node.args[1]
        b = linear_bias(node)
        xv, wv = val(x), val(w)
        rows = _rows(xv)
        deq = dequantized(w)
        if deq is None and wv.dtype == torch.bfloat16 and kernels.takes(least, xv, rows, None if b is None else val(b)):
            ed.replace(node, lambda: ed.call(kernels.op("small_m_linear", current()), (x, w, b), like=node))
            by_kernel += 1
        else:
            if deq is not None:
                ok = xv.device.type == "cpu" and rows <= max_rows_int8
            else:
                ok = xv.device.type == "cpu" and xv.dtype in LOW_PRECISION and wv.dtype == xv.dtype and rows <= max_rows
            if not ok:
                kept += 1
                continue
            source, scale = deq if deq is not None else (w, None)
            ed.replace(node, lambda: _reduction(ed, node, x, source, scale, b, xv, wv.shape, max_chunk))
            int8 += deq is not None
        lowered += 1
    report = {"lowered": lowered, "int8": int8, "kernel": by_kernel, "kept": kept, "max_rows": max_rows,
              "max_rows_int8": max_rows_int8, "max_chunk": max_chunk}
    return (ed.finish() if lowered else ep), report


def _reduction(ed, node, x, w, scale, b, xv, w_shape, max_chunk):
    """y = x @ w.T (* scale) (+ b) as multiply + sum with fp32 accumulation, in x's dtype.

    One row: out[n] = sum_k x[k] w[n, k]. Several rows (int8 decode batches): computed as
    out.T [N, R], so that the loop over rows runs inside the loop over weight rows and each
    weight row is read from memory once for every activation row (the R activation rows, a few
    KB each, stay in cache); the transpose back is a view."""
    n_out, k_in = w_shape
    chunks = next(c for c in range(1, k_in + 1) if k_in % c == 0 and k_in // c <= max_chunk)
    lead = list(xv.shape[:-1])
    rows = math.prod(lead)
    # The fp32 activation as a buffer of its own: left to itself, Inductor inlines the
    # producer (residual add + RMSNorm, the embedding lookup) into the reduction loop and
    # recomputes it for every output row.
    xf = ed.call(aten._to_copy.default, (x,), {"dtype": torch.float32}, like=node)
    xf = ed.call(FORCE_STRIDES, (xf, contiguous_strides(xv.shape)), like=node)
    wf = ed.call(aten._to_copy.default, (w,), {"dtype": torch.float32}, like=node)
    if rows == 1:
        xf = ed.call(aten.view.default, (xf, lead + [1, chunks, k_in // chunks]), like=node)
        wf = ed.call(aten.view.default, (wf, [n_out, chunks, k_in // chunks]), like=node)
        y = ed.call(aten.sum.dim_IntList, (ed.call(aten.mul.Tensor, (xf, wf), like=node), [-1]), like=node)
        if chunks > 1:
            # partial sums [..., N, c] stored chunk-major, so that the second sum (which
            # Inductor unrolls into its consumers) reads them contiguously along N
            y = ed.call(FORCE_STRIDES, (y, chunk_major_strides(lead, n_out, chunks)), like=node)
        y = ed.call(aten.sum.dim_IntList, (y, [-1]), like=node)                # [..., N]
        if scale is not None:
            y = ed.call(aten.mul.Tensor, (y, scale), like=node)
        if b is not None:
            y = ed.call(aten.add.Tensor, (y, ed.call(aten._to_copy.default, (b,), {"dtype": torch.float32},
                                                     like=node)), like=node)
        return ed.call(aten._to_copy.default, (y,), {"dtype": xv.dtype}, like=node)
    xf = ed.call(aten.view.default, (xf, [1, rows, chunks, k_in // chunks]), like=node)
    wf = ed.call(aten.view.default, (wf, [n_out, 1, chunks, k_in // chunks]), like=node)
    y = ed.call(aten.sum.dim_IntList, (ed.call(aten.mul.Tensor, (xf, wf), like=node), [-1]), like=node)  # [N, R, c]
    if chunks > 1:
        y = ed.call(FORCE_STRIDES, (y, [rows, 1, n_out * rows]), like=node)   # chunk-major [c, N, R]
    y = ed.call(aten.sum.dim_IntList, (y, [-1]), like=node)                    # [N, R]
    if scale is not None:
        y = ed.call(aten.mul.Tensor, (y, ed.call(aten.unsqueeze.default, (scale, 1), like=node)), like=node)
    if b is not None:
        bf = ed.call(aten._to_copy.default, (b,), {"dtype": torch.float32}, like=node)
        y = ed.call(aten.add.Tensor, (y, ed.call(aten.unsqueeze.default, (bf, 1), like=node)), like=node)
    y = ed.call(aten._to_copy.default, (y,), {"dtype": xv.dtype}, like=node)
    y = ed.call(aten.permute.default, (y, [1, 0]), like=node)                  # [R, N], a view
    return ed.call(aten.view.default, (y, lead + [n_out]), like=node) if len(lead) == 1 else \
        ed.call(aten.reshape.default, (y, lead + [n_out]), like=node)
