"""Fusion passes over exported FX graphs, applied in order before AOTInductor lowering.

Each pass is one module with `apply(ep) -> (ep, report)`; `report` says what it changed.
A pass never modifies the program it is given (it returns a new one, or the same one when
there was nothing to do). Helpers shared by passes: program_edit.py (graph + signature +
state-dict surgery), linear_fusion.py (sibling linears -> one).

Order, and why:
1. qkv_fusion, 2. gate_up_fusion: weight re-layouts. They key on parameter names and on
   `aten.linear` exactly as export produced it, so they run before any pass that could
   rewrite linears (a small-M GEMV lowering, quantisation, folding a norm's weight into
   the next linear's columns): such a pass then sees, and transforms, the fused weight
   once instead of three (two) times, and the artifact stores the fused layout only.
   They are independent of each other.
3. add_rmsnorm: rewrites the residual add + norm feeding those linears. It needs the
   norm's `weight * x` still in place, so it comes before any weight-folding pass; it
   does not care whether the linears after it are fused (the fused linear has the same
   input node).
4. rope_table: touches only the rotary subgraph (positions -> cos/sin), so its tables are
   built once per program whatever the passes before it did.
5. small_m_linear: lowers one-row linears (batch-1 decode, the prefill head) of bf16/fp16 CPU
   graphs to multiply + sum, or bf16 linears of up to 8 rows to the kernels/ library's
   internvl::small_m_linear where the target has it (AVX512-BF16 without AMX: 1-8 rows; AVX2: 3-8); last, so
   it sees the fused weights (one GEMV per fused matrix) and no later pass has to recognise its
   reductions as linears.
(QUANT=int8: int8_weights between 4 and 5: the LLM's linear weights -> int8 + per-row scales; where the
   target has the kernel library, linears of <= 8 rows call its internvl::small_m_linear_int8 directly,
   elsewhere small_m_linear then reads the int8 bytes in the one-row decode graphs.
 QUANT=int4: int4_weights in the same place: group-wise int4 (128 weights a scale); linears of <= 8 rows call
   internvl::small_m_linear_int4 where the target has the kernel library, the rest dequantise row slices.
   Both call the library's fp32 GEMM (linear_fp32_int8 / _int4) above 8 rows of bf16 graphs without native
   bf16, and from 2 rows (int8; int4 from 1) of fp32 graphs.)
6. fp32_gemm: on a CPU target without native bf16 only, the GEMM-bound ops left (linears over
   several rows, the patch-embedding conv, SDPA) of bf16/fp16 graphs compute in fp32 from
   bf16 storage: bf16 linears of more than 8 rows through the kernel library's internvl::linear_fp32
   where the target has AVX2 + FMA (it converts each weight while packing it), the rest through a
   converted copy; after small_m_linear, so the one-row linears keep their in-register conversion.
"""
from __future__ import annotations

import importlib
import operator

from torch.export import ExportedProgram

PASS_ORDER: list[str] = ["qkv_fusion", "gate_up_fusion", "add_rmsnorm", "rope_table", "small_m_linear", "fp32_gemm"]
# QUANT=<kind> adds its pass right before small_m_linear: after the fusions (one scale set per fused
# matrix), before the lowering that reads the quantised bytes.
QUANT_PASSES: dict[str, str] = {"int8": "int8_weights", "int4": "int4_weights"}


def pass_list(names: list[str] | None = None, quant: str = "none") -> list[str]:
    """The passes a compile runs: `names` (default PASS_ORDER) plus the quantisation pass of `quant`."""
    names = list(PASS_ORDER if names is None else names)
    if quant == "none":
        return names
    if quant not in QUANT_PASSES:
        raise ValueError(f"QUANT must be one of none, {', '.join(QUANT_PASSES)}; got {quant!r}")
    q = QUANT_PASSES[quant]
    if q not in names:
        names.insert(names.index("small_m_linear") if "small_m_linear" in names else len(names), q)
    return names


def run_passes(ep: ExportedProgram, names: list[str] | None = None,
               options: dict[str, dict] | None = None) -> tuple[ExportedProgram, dict]:
    """Apply `names` (default PASS_ORDER) in order. options: pass name -> keyword arguments
    for its `apply` (e.g. {"rope_table": {"max_context": 4096}})."""
    reports = {}
    for name in (PASS_ORDER if names is None else names):
        mod = importlib.import_module(f"{__name__}.{name}")
        before = count_ops(ep)
        ep, report = mod.apply(ep, **(options or {}).get(name, {}))
        reports[name] = {**report, "ops": [before, count_ops(ep)]}
    return ep, reports


def count_ops(ep: ExportedProgram) -> int:
    """call_function nodes, less export's `_assert_tensor_metadata` checks and tuple `getitem`s."""
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target is not operator.getitem
               and "_assert_tensor_metadata" not in str(n.target))
