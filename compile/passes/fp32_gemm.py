"""bf16/fp16 storage, fp32 arithmetic: the GEMM-bound ops of graphs for a CPU without native bf16.

PyTorch's bf16 GEMM (oneDNN) has a fast path only where the CPU has AVX512-BF16 or AMX. On an
AVX2 box (Zen 3) a bf16 artifact's vision and prefill graphs ran about 6x slower than the fp32
artifact's (first token after 109 s against 18.6 s, docs/performance.md), and one 512x2048x8192
GEMM measured 11 GFLOP/s in bf16 against 112 in fp32 (oneDNN limited to AVX2 on an AMX box,
build notes in docs/performance.md). The weights stay bf16 in memory and on disk; this pass makes
each such op convert its operands to fp32 right before it (a weight into a scratch buffer the
size of one matrix, which Inductor frees or reuses after the op), compute in fp32 and cast the
result back, so the rest of the graph is unchanged.

A linear's weight is converted and multiplied in slices of output rows whose fp32 copy is at
most `chunk_mb` (the results concatenated): a whole converted matrix (128 MB fp32 for the 2B's
gate/up) is a fresh allocation above glibc's mmap threshold on every call, and touching its new
pages cost more than the conversion itself (16 MB converted into a reused buffer: 16 ms; into a
fresh one: 76 ms, AMX box under load); a slice of a few MB is reused from the heap and stays
in cache between its conversion and its GEMM.

Where the target has AVX2 + FMA (`kernel=None`: kernels.gemm_kernel), a bf16 linear over more than
kernels.MAX_ROWS rows calls `internvl::linear_fp32` instead (kernels/fp32_gemm.cpp: each weight converted once
per call while it is packed, fp32 products and sums, a BLIS-style micro-kernel near the FMA peak): AVX2 emulated
on a Zen 4, 2 threads, 2B prefill shapes (473 x 2048 x 4096 / 16384, 473 x 8192 x 2048, 4100 x 1024 x 4096)
191-218 GFLOP/s against MKL's sgemm on weights converted beforehand 168-196 and the converted weight 136-163
(a plain FMA loop: 216-222), and from 9 rows on it beats oneDNN's bf16 GEMM too (K = 2048, N = 8192, M = 16 /
48: 4.4 / 9.7 ms against 12.3 / 37.1; docs/performance.md, eleventh round).

Which ops otherwise: `linear` over `min_rows` rows or more (the one-row linears were lowered to
multiply + sum by small_m_linear already, which converts in registers), `conv2d` (the ViT's patch
embedding) and `scaled_dot_product_attention` (vision and prefill-chunk attention). The decode
graphs' attention is a multiply + sum with fp32 accumulation already and is not touched.

Applied only when the compile target lacks native bf16 (`targets.current().native_bf16`); the
report says so either way, and the pipeline records it in the manifest.
"""
from __future__ import annotations


import torch
from torch.export import ExportedProgram

from .program_edit import ProgramEditor, aten, is_op, linear_bias, rows, val

LOW_PRECISION = (torch.bfloat16, torch.float16)
GEMM_OPS = (aten.linear.default, aten.conv2d.default, aten.scaled_dot_product_attention.default)


def _rows(node) -> int:
    """The GEMM's M: rows of a linear's input; for other ops, anything over the threshold."""
    if node.target is aten.linear.default:
        return rows(val(node.args[0]))
    return 1 << 30


def apply(ep: ExportedProgram, native_bf16: bool | None = None, min_rows: int = 48,
          chunk_mb: float = 8.0, kernel: bool | None = None) -> tuple[ExportedProgram, dict]:
    """kernel: bf16 linears over more than kernels.MAX_ROWS rows call internvl::linear_fp32 (None: where the
    target has it, kernels.gemm_kernel; True: any target; False: never). min_rows: the fewest rows a linear is
    widened at otherwise. Below it (decode batches) the converted
    copy costs more than the GEMM it speeds up: oneDNN limited to AVX2, 2 threads, K=2048, N=8192,
    ms bf16 -> converted fp32: M=8 29 -> 70, M=32 92 -> 106, M=64 260 -> 108, M=512 1500 -> 379
    (the converted copy a fresh allocation each call; build notes in docs/performance.md)."""
    from ... import kernels
    from ..targets import current
    if native_bf16 is None:
        native_bf16 = current().native_bf16
    report = {"native_bf16": native_bf16, "min_rows": min_rows, "chunk_mb": chunk_mb, "lowered": 0, "kept": 0,
              "kernel": 0}
    if native_bf16:
        return ep, report
    ed = ProgramEditor(ep)
    for node in list(ed.graph.nodes):
        if not is_op(node, *GEMM_OPS):
            continue
        out = val(node)
        if node.target is aten.linear.default and val(node.args[1]).dtype == torch.bfloat16 \
                and kernels.gemm_takes(kernel, current(), native_bf16, val(node.args[0]), _rows(node)):
            ed.replace(node, lambda: ed.call(kernels.op("linear_fp32", current()),
                                             (node.args[0], node.args[1], linear_bias(node)), like=node))
            report["kernel"] += 1
            continue
        if out.device.type != "cpu" or out.dtype not in LOW_PRECISION or _rows(node) < min_rows:
            report["kept"] += 1
            continue

        def up(a):
            v = val(a)
            if isinstance(v, torch.Tensor) and v.dtype == out.dtype:
                return ed.call(aten._to_copy.default, (a,), {"dtype": torch.float32}, like=node)
            return a

        def widened():
            if node.target is aten.linear.default:
                wide = _sliced_linear(ed, node, up, chunk_mb)
            else:
                args = tuple(up(a) for a in node.args)
                kwargs = {k: up(a) for k, a in node.kwargs.items()}
                wide = ed.call(node.target, args, kwargs, like=node)
            return ed.call(aten._to_copy.default, (wide,), {"dtype": out.dtype}, like=node)
        ed.replace(node, widened)
        report["lowered"] += 1
    return (ed.finish() if report["lowered"] or report["kernel"] else ep), report


def _sliced_linear(ed: ProgramEditor, node, up, chunk_mb: float):
    """fp32 linear(x, w, b) computed in slices of w's output rows of at most chunk_mb in fp32."""
    x, w, b = node.args[0], node.args[1], linear_bias(node)
    n_out, k_in = val(w).shape
    return sliced_linear(ed, node, up(x), n_out, k_in, 4, chunk_mb,
                         lambda start, end: up(row_slice(ed, node, w, start, end, n_out)),
                         None if b is None else lambda start, end: up(row_slice(ed, node, b, start, end, n_out)))


def row_slice(ed: ProgramEditor, node, t, start: int, end: int, n_out: int):
    """Rows [start, end) of t (t itself when that is all of it)."""
    return t if (start, end) == (0, n_out) else ed.call(aten.slice.Tensor, (t, 0, start, end), like=node)


def sliced_linear(ed: ProgramEditor, node, x, n_out: int, k_in: int, elem_bytes: int, chunk_mb: float,
                  weight_rows, bias_rows=None):
    """linear(x, W, b) over equal slices of W's output rows of at most chunk_mb (elem_bytes per element),
    the results concatenated; weight_rows(start, end) / bias_rows(start, end) build a slice's operands,
    placed right before its GEMM (shared with int8_weights' dequantised GEMMs)."""
    rows = max(1, int(chunk_mb * 2**20 // (elem_bytes * k_in)))
    rows = n_out if rows >= n_out else -(-n_out // -(-n_out // rows))          # equal slices
    parts = []
    for start in range(0, n_out, rows):
        end = min(n_out, start + rows)
        args = (x, weight_rows(start, end)) + ((bias_rows(start, end),) if bias_rows is not None else ())
        parts.append(ed.call(aten.linear.default, args, like=node))
    return parts[0] if len(parts) == 1 else ed.call(aten.cat.default, (parts, -1), like=node)
