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
"""
from __future__ import annotations

import math

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
from torch.export import ExportedProgram

from .program_edit import ProgramEditor, aten, is_op, val

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


def apply(ep: ExportedProgram, max_rows: int = 1, max_chunk: int = 4096) -> tuple[ExportedProgram, dict]:
    ed = ProgramEditor(ep)
    lowered, kept = 0, 0
    for node in list(ed.graph.nodes):
        if not is_op(node, aten.linear.default):
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        xv, wv = val(x), val(w)
        rows = math.prod(xv.shape[:-1])
        if xv.device.type != "cpu" or xv.dtype not in LOW_PRECISION or wv.dtype != xv.dtype or rows > max_rows:
            kept += 1
            continue
        n_out, k_in = wv.shape
        chunks = next(c for c in range(1, k_in + 1) if k_in % c == 0 and k_in // c <= max_chunk)
        lead = list(xv.shape[:-1])
        with ed.graph.inserting_before(node):
            # The fp32 activation as a buffer of its own: left to itself, Inductor inlines the
            # producer (residual add + RMSNorm, the embedding lookup) into the reduction loop and
            # recomputes it for every output row.
            xf = ed.call(aten._to_copy.default, (x,), {"dtype": torch.float32}, like=node)
            xf = ed.call(FORCE_STRIDES, (xf, contiguous_strides(xv.shape)), like=node)
            xf = ed.call(aten.view.default, (xf, lead + [1, chunks, k_in // chunks]), like=node)
            wf = ed.call(aten._to_copy.default, (w,), {"dtype": torch.float32}, like=node)
            wf = ed.call(aten.view.default, (wf, [n_out, chunks, k_in // chunks]), like=node)
            y = ed.call(aten.sum.dim_IntList, (ed.call(aten.mul.Tensor, (xf, wf), like=node), [-1]), like=node)
            if chunks > 1:
                # partial sums [..., N, c] stored chunk-major, so that the second sum (which
                # Inductor unrolls into its consumers) reads them contiguously along N
                y = ed.call(FORCE_STRIDES, (y, chunk_major_strides(lead, n_out, chunks)), like=node)
            y = ed.call(aten.sum.dim_IntList, (y, [-1]), like=node)                # [..., N]
            if b is not None:
                y = ed.call(aten.add.Tensor, (y, ed.call(aten._to_copy.default, (b,), {"dtype": torch.float32},
                                                         like=node)), like=node)
            out = ed.call(aten._to_copy.default, (y,), {"dtype": xv.dtype}, like=node)
        node.replace_all_uses_with(out)
        ed.graph.erase_node(node)
        lowered += 1
    report = {"lowered": lowered, "kept": kept, "max_rows": max_rows, "max_chunk": max_chunk}
    return (ed.finish() if lowered else ep), report
