"""Decode GEMV lowering: a linear over a few rows becomes multiply + sum with fp32 accumulation.

A decode step multiplies every weight matrix by a handful of token rows, so it is bound by
reading the weights. On CPU, oneDNN's bf16 GEMV reads them far below the memory bandwidth
(DESIGN.md: ~23 GB/s of ~66 GB/s on an AVX512-BF16 EPYC, worse without native bf16), while an
Inductor-generated reduction over `x.float() * w.float()` streams each weight row once,
converting bf16 to fp32 in registers. So for CPU graphs in bf16/fp16 whose linear inputs have at
most `max_rows` rows, `aten.linear(x, w, b)` is rewritten as

    sum(x.float()[..., None, :] * w.float(), -1) (+ b.float()), cast back to x's dtype

The weights stay where they are (no re-layout), so every graph still binds the same tensors.
Prefill and vision graphs (hundreds of rows) keep the GEMM, which is compute-bound there.
"""
from __future__ import annotations

import math

import torch
from torch.export import ExportedProgram

from .program_edit import ProgramEditor, aten, is_op, val

LOW_PRECISION = (torch.bfloat16, torch.float16)


def apply(ep: ExportedProgram, max_rows: int = 4) -> tuple[ExportedProgram, dict]:
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
        with ed.graph.inserting_before(node):
            xf = ed.call(aten._to_copy.default, (x,), {"dtype": torch.float32}, like=node)
            xf = ed.call(aten.unsqueeze.default, (xf, -2), like=node)              # [..., 1, K]
            wf = ed.call(aten._to_copy.default, (w,), {"dtype": torch.float32}, like=node)  # [N, K]
            y = ed.call(aten.sum.dim_IntList, (ed.call(aten.mul.Tensor, (xf, wf), like=node), [-1]), like=node)
            if b is not None:
                y = ed.call(aten.add.Tensor, (y, ed.call(aten._to_copy.default, (b,), {"dtype": torch.float32},
                                                         like=node)), like=node)
            out = ed.call(aten._to_copy.default, (y,), {"dtype": xv.dtype}, like=node)
        node.replace_all_uses_with(out)
        ed.graph.erase_node(node)
        lowered += 1
    report = {"lowered": lowered, "kept": kept, "max_rows": max_rows}
    return (ed.finish() if lowered else ep), report
