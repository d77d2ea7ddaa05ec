"""Weight-only int8 (`QUANT=int8`): the LLM's linear weights stored as int8 with an fp32 scale per output channel.

Decode reads every weight once per step, so its speed is the weight bytes over the memory
bandwidth: int8 halves the bf16 bytes. Activations stay in the artifact's dtype (bf16/fp32).
For each linear of the language model (`scope`: the fused QKV and gate/up, the output and down
projections, the output head) the weight `W [N, K]` becomes

    q = round(W / s) in [-127, 127] (int8),   s[n] = max_k |W[n, k]| / 127   (fp32, symmetric, per row)

and the linear's weight input becomes the dequantisation `(q.float() * s[:, None]).to(x.dtype)`, lowered by rows:
- bf16 CPU linears of up to kernels.MAX_ROWS (8) rows where the target has the kernel (kernels.min_rows(target):
  AVX512-BF16 or AVX2 + FMA, no AMX; the `kernel` option): `internvl::small_m_linear_int8(x, q, s, b)`
  of kernels/, which widens the int8 bytes in registers once for all rows and applies `s` after the sum. 24
  layers of 2B matrices, 2 threads, Zen 4, ms at M = 1 / 2 / 4 / 8: the kernel 53-64 / 46 / 70-95 / 125-160,
  against the reduction below about 118 at M = 1, `_weight_int8pack_mm` 120 / 165 / 140 / 273 (docs/performance.md,
  fifth round). Elsewhere:
- Linears over at most DECODE_ROWS rows (batch-1 decode, the prefill head): small_m_linear, which
  runs after this pass, recognises that pattern (`dequantized`) and lowers them to a reduction
  that reads the int8 bytes and applies `s` after the sum: decode never writes a dequantised copy.
- bf16 graphs on a native-bf16 target, PACK_MIN_ROWS..PACK_ROWS rows (decode batches 2-8): ATen's
  weight-only int8 GEMM (`_weight_int8pack_mm`), which reads the int8 matrix once per 4 rows.
- More than kernels.MAX_ROWS rows (prefill chunks) of bf16 activations on a target without native bf16, or 2+ rows
  of fp32 activations on any target with AVX2 + FMA: `internvl::linear_fp32_int8(x, q, s, b)`, kernels/fp32_gemm.cpp's
  GEMM, which dequantises the int8 bytes to fp32 as it packs them (kernels.gemm_takes).
- Other linears of more rows (larger decode batches, prefill chunks) dequantise slices of at most `chunk_mb` of output rows
  into a scratch buffer and run the GEMM per slice (results concatenated): a whole dequantised
  matrix would be a fresh allocation above glibc's mmap threshold every call, whose page faults
  cost more than the dequantisation (see fp32_gemm.py); a slice is reused and stays in cache.

The bf16 weights leave the program; every graph gets the same int8 tensor and scale (TensorCache),
so the artifact stores one quantised copy, bound by all graphs. The ViT, projector, embedding table
and norms are kept in the artifact's dtype (the vision graphs are compute-bound: int8 storage
would only add a dequantisation there).
"""
from __future__ import annotations

import math

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ... import kernels
from ..targets import current
from .fp32_gemm import row_slice, sliced_linear
from .program_edit import ProgramEditor, TensorCache, aten, cast_dtype, is_op, linear_bias, val, rows as _rows

SCOPE = "language_model."
QMAX = 127
# Linears over this many rows or fewer read int8 in registers (small_m_linear). One row only: the
# reduction converts each weight element once per activation row, so at 4 rows it cost 2.7x one row
# (2B decode, AMX box under load: 958 against 354 ms per step), while the sliced GEMM below reads
# the int8 matrix once (bf16 batch 4 through oneDNN: 470-720 ms).
DECODE_ROWS = 1
# ATen's weight-only int8 GEMM (`_weight_int8pack_mm`, scales in the activation dtype) reads the int8
# matrix once per 4 activation rows. With bf16 activations on an AVX512-BF16/AMX box it is fast; with
# fp32 activations it has no vector path (eager, 2 threads, AMX box, 24 layers of 2B matrices, ms per
# pass over all of them, bf16 F.linear (oneDNN, AMX) / int8pack bf16 x: M=1 176 / 108, M=2 167 / 132,
# M=4 177 / 154, M=8 170 / 275; int8pack with fp32 x: one 4096x2048 matrix 3.7 ms at M=1 against 0.3
# in bf16). In whole 2B int8 artifacts (2 threads, AMX box, decode_ab): 2 rows 12.2 tok/s, 4 rows 19.2-19.5
# (bf16 21.3; the sliced GEMMs below gave 8.0-8.5), 8 rows through the sliced GEMMs 16.4-18.1 (bf16 32.9);
# AOTI, 24 layers at one row: int8pack 117.6 ms, small_m_linear's int8 reduction 118.3 (even: the
# reduction stays). So it serves bf16 graphs on native-bf16 targets, at PACK_MIN_ROWS..PACK_ROWS rows. It needs
# its int8 weight 16-byte aligned (torch 2.13 segfaults otherwise): the artifact's weights file
# aligns every tensor to 64 bytes (runtime/weights_file.py) and the loader refuses an unaligned one.
PACK_ROWS = 8
PACK_MIN_ROWS = 2
# Slice sizes of the dequantised GEMMs: decode batches (<= GEMM_SMALL_ROWS rows) take slices small
# enough to stay in cache between their dequantisation and their GEMM; prefill chunks larger ones.
GEMM_SMALL_ROWS = 64
_QUANTIZED = TensorCache()


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: -> (q [N, K] int8, scale [N] fp32) with w ~= q * scale[:, None]."""
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w32 / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantized(node) -> tuple | None:
    """(q placeholder, scale placeholder) if `node` is this pass's dequantisation of a weight, else None."""
    if cast_dtype(node) is not None:          # the cast back to the activation dtype
        node = node.args[0]
    if not is_op(node, aten.mul.Tensor):
        return None
    wq, s = node.args
    if not (is_op(wq, aten._to_copy.default) and is_op(s, aten.unsqueeze.default)):
        return None
    q = wq.args[0]
    if getattr(val(q), "dtype", None) is not torch.int8 or q.op != "placeholder":
        return None
    return q, s.args[0]


def apply(ep: ExportedProgram, scope: str = SCOPE, chunk_mb: float = 8.0, small_chunk_mb: float = 2.0,
          native_bf16: bool | None = None, pack_rows: int = PACK_ROWS,
          pack_min_rows: int = PACK_MIN_ROWS, kernel: bool | None = None) -> tuple[ExportedProgram, dict]:
    """native_bf16 (default: the compile target's): without it, the sliced GEMMs of bf16/fp16 graphs
    dequantise to fp32 and compute in fp32 (no bf16 GEMM without native bf16: fp32_gemm.py), and
    ATen's int8 GEMM is not used. pack_min_rows..pack_rows: the rows at which bf16 linears on a
    native-bf16 target take ATen's int8 GEMM (pack_rows=0: never). kernel: bf16 linears of up to
    kernels.MAX_ROWS rows call internvl::small_m_linear_int8 (None: the target decides; True: from 1 row on
    any target, for tests; False: never), and those over more rows of a bf16 graph without native bf16 or over 2+ rows
    of an fp32 graph internvl::linear_fp32_int8 (kernels.gemm_takes: fp32 from the int8 bytes, instead of dequantised slices
    through MKL's sgemm)."""
    if native_bf16 is None:
        native_bf16 = current().native_bf16
    least = kernels.least_rows(kernel, current())
    ed = ProgramEditor(ep)
    done, q_bytes, src_bytes, sliced, packed, by_kernel, by_gemm = [], 0, 0, 0, 0, 0, 0
    for node, w_node, fqn, w in scoped_linears(ed, scope):
        base = fqn[: -len(".weight")]
        q, scale = _QUANTIZED.get(base, [w], lambda w=w: tuple(
            torch.nn.Parameter(t, requires_grad=False) for t in quantize(w)))
        x = node.args[0]
        q_in = ed.add_parameter(f"{base}.weight_int8", q, before=w_node)
        s_in = ed.add_parameter(f"{base}.weight_scale", scale, before=w_node)
        rows = _rows(val(x))
        x_dtype = val(x).dtype
        b = linear_bias(node)
        if kernels.takes(least, val(x), rows, None if b is None else val(b)):
            ed.replace(node, lambda: ed.call(kernels.op("small_m_linear_int8", current()), (x, q_in, s_in, b), like=node))
            by_kernel += 1
        elif native_bf16 and x_dtype == torch.bfloat16 and pack_min_rows <= rows <= pack_rows:
            s_x = ed.add_parameter(
                f"{base}.weight_scale_{str(x_dtype).split('.')[-1]}",
                _QUANTIZED.get(base + ".scale", [scale], lambda: torch.nn.Parameter(scale.detach().to(x_dtype),
                                                                                     requires_grad=False),
                               extra_key=(x_dtype,)), before=w_node)
            ed.replace(node, lambda: _int8pack(ed, node, q_in, s_x))
            packed += 1
        elif rows <= DECODE_ROWS:           # small_m_linear lowers it: the linear stays, over the dequantisation
            with ed.graph.inserting_before(node):
                wd = _dequant(ed, node, q_in, s_in, x_dtype)
            node.args = (x, wd, *node.args[2:])
        elif kernels.gemm_takes(kernel, current(), native_bf16, val(x), rows, quantized=True):
            ed.replace(node, lambda: ed.call(kernels.op("linear_fp32_int8", current()), (x, q_in, s_in, b), like=node))
            by_gemm += 1
        else:
            ed.replace(node, lambda: _sliced_gemm(ed, node, q_in, s_in,
                                                  small_chunk_mb if rows <= GEMM_SMALL_ROWS else chunk_mb,
                                                  wide=not native_bf16))
            sliced += 1
        ed.drop_input_if_unused(w_node)
        ed.drop_input_if_unused(s_in)           # the int8 GEMM takes the scale in x's dtype instead
        done.append(fqn)
        q_bytes += q.numel() + 4 * scale.numel()
        src_bytes += w.numel() * w.element_size()
    report = {"quantized": len(done), "gemm_sliced": sliced, "int8pack": packed, "kernel": by_kernel,
              "gemm_kernel": by_gemm, "scope": scope,
              "bytes": [src_bytes, q_bytes]}
    if not done:
        return ep, report
    report["example"] = done[0]
    return ed.finish(), report


def scoped_linears(ed: ProgramEditor, scope: str):
    """(linear node, weight input node, weight fqn, weight tensor) of every linear whose weight is a 2-D
    floating parameter under `scope`: what a weight-only quantisation pass rewrites (this one, int4_weights)."""
    for node in list(ed.graph.nodes):
        if not is_op(node, aten.linear.default):
            continue
        w_node = node.args[1]
        fqn = ed.fqn(w_node, InputKind.PARAMETER)
        w = ed.tensor(w_node)
        if fqn is not None and fqn.startswith(scope) and fqn.endswith(".weight") and w.dim() == 2 \
                and w.is_floating_point():
            yield node, w_node, fqn, w


def _dequant(ed: ProgramEditor, node, q, s, dtype):
    """(q.float() * s[:, None]).to(dtype): the pattern `dequantized` recognises."""
    wd = ed.call(aten._to_copy.default, (q,), {"dtype": torch.float32}, like=node)
    wd = ed.call(aten.mul.Tensor, (wd, ed.call(aten.unsqueeze.default, (s, 1), like=node)), like=node)
    return wd if dtype == torch.float32 else ed.call(aten._to_copy.default, (wd,), {"dtype": dtype}, like=node)


def _int8pack(ed: ProgramEditor, node, q, s_x):
    """linear(x, dequant(q, s), b) as ATen's weight-only int8 GEMM over x flattened to 2-D."""
    x, b = node.args[0], linear_bias(node)
    lead = list(val(x).shape[:-1])
    x2 = ed.call(aten.reshape.default, (x, [math.prod(lead), val(x).shape[-1]]), like=node)
    y = ed.call(aten._weight_int8pack_mm.default, (x2, q, s_x), like=node)
    if b is not None:
        y = ed.call(aten.add.Tensor, (y, b), like=node)
    return ed.call(aten.reshape.default, (y, lead + [val(q).shape[0]]), like=node)


def _sliced_gemm(ed: ProgramEditor, node, q, s, chunk_mb: float, wide: bool, dequant=None):
    """linear(x, dequant(q, s), b) in slices of output rows, each dequantised right before its GEMM
    (in fp32 if `wide` and x is bf16/fp16; the result cast back to x's dtype). dequant(ed, node, q rows,
    s rows, dtype): the weight slice as graph ops (default: this pass's int8 `_dequant`; int4_weights' own)."""
    dequant = dequant or _dequant
    x, b = node.args[0], linear_bias(node)
    out_dtype = val(x).dtype
    dtype = torch.float32 if wide else out_dtype
    if dtype != out_dtype:
        x = ed.call(aten._to_copy.default, (x,), {"dtype": dtype}, like=node)
    n_out, k_in = val(q).shape[0], val(x).shape[-1]

    def weight_rows(start, end):
        return dequant(ed, node, row_slice(ed, node, q, start, end, n_out), row_slice(ed, node, s, start, end, n_out),
                       dtype)

    def bias_rows(start, end):
        cut = row_slice(ed, node, b, start, end, n_out)
        return cut if val(cut).dtype == dtype else ed.call(aten._to_copy.default, (cut,), {"dtype": dtype}, like=node)

    y = sliced_linear(ed, node, x, n_out, k_in, torch.finfo(dtype).bits // 8, chunk_mb, weight_rows,
                      bias_rows if b is not None else None)
    return y if dtype == out_dtype else ed.call(aten._to_copy.default, (y,), {"dtype": out_dtype}, like=node)
