"""checkpoint -> graphs -> export per bucket -> passes -> AOTInductor -> artifact."""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from .. import kernels
from ..graphs.attention import decode_kernel
from ..graphs.config import ModelConfig
from ..graphs.model import build_model
from ..graphs.parallel import SINGLE, TPInfo
from ..runtime.buckets import GraphKey
from ..runtime.tokenizer import Tokenizer
from ..runtime.manifest import DTYPES
from .aoti import compile_graphs
from .artifact import collect_weights, dir_size, write_artifact
from .buckets import Buckets
from .export import export_graph
from .passes import pass_list, run_passes
from .spec import build_spec
from .tp import (TP_COMPILE_OPTIONS, check_outputs, check_tp, count_collectives, fake_process_group, rank_shard,
                 reuse_compiled)



def compile_model(cfg: ModelConfig, weights: dict, tokenizer_dir: Path, out: Path, buckets: Buckets,
                  dtype: str = "bf16", backend: str = "cpu", tp: int = 1, source: dict | None = None,
                  passes: list[str] | None = None, log: Callable[[str], None] = print,
                  target: str = "native", opset: int = 18, quant: str = "none",
                  pass_options: dict[str, dict] | None = None, attention_kernel: bool | None = None,
                  exact_prefill: bool = True) -> dict:
    """Checkpoint weights -> artifact directory `out`: per rank, export every bucket graph, run the
    passes, compile (rank 0's packages reused by the other ranks when their programs agree), then
    write the artifact. target: the CPU the artifact is for (runtime/isa.py: native, x86-64-v3,
    x86-64-v4, ...); compile/targets.py applies it to Inductor, and `targets.current()` tells passes
    about it. quant: "none", "int8" or "int4" (weight-only, compile/passes/int8_weights.py,
    int4_weights.py). pass_options:
    pass name -> keyword arguments for its `apply` (e.g. {"small_m_linear": {"kernel": True}}).
    attention_kernel: decode attention through kernels/' internvl::paged_decode_attention (None: where
    kernels.attention_kernel(target) says so; True: any CPU target; False: never; the CPU backend only).
    exact_prefill: prefill graphs take chunks of any length up to their bucket (compile/export.py
    `dynamic_tokens`; the CPU backend at TP = 1 only), so no chunk is padded to its bucket."""
    if quant != "none" and backend != "cpu":
        raise ValueError(f"QUANT={quant} is implemented for BACKEND=cpu only (got BACKEND={backend})")
    if backend == "onnx":     # ONNX graphs for onnxruntime / ATC: compile/backends/onnx.py
        from .backends.onnx import compile_onnx
        return compile_onnx(cfg, weights, tokenizer_dir, out, buckets, dtype=dtype, opset=opset, tp=tp,
                            source=source, passes=passes, log=log)
    from . import targets
    cpu_target = _check_request(cfg, backend, target, tp, targets)
    t_start = time.perf_counter()
    device = torch.device("cuda" if backend == "cuda" else "cpu")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    tdtype = DTYPES[dtype]
    weights = {k: (v.to(device=device, dtype=tdtype) if v.is_floating_point() else v.to(device))
               for k, v in weights.items()}
    names = buckets.graph_names()
    log(f"[compile] {cfg.name}: {len(names)} graphs ({', '.join(names)}), dtype {dtype}, backend {backend}"
        + (f", target {target} (-march={cpu_target.march}, {cpu_target.vec_isa or 'native'} vectors, "
           f"native bf16: {'yes' if cpu_target.native_bf16 else 'no'})" if backend == "cpu" else "")
        + (f", TP={tp} ({tp} ranks)" if tp > 1 else ""))
    out = Path(out)
    staging = _fresh_staging(out)

    def progress(msg):
        log(f"[aoti] {msg} (elapsed {time.perf_counter() - t_start:.0f} s)")

    ranks, pass_reports, graph_s, tp_info, uses_kernels = [], {}, {}, {}, False
    use_attention_kernel = backend == "cpu" and (kernels.attention_kernel(cpu_target) if attention_kernel is None
                                                 else attention_kernel)
    attention_op = kernels.op("paged_decode_attention", cpu_target) if use_attention_kernel else None
    # A fake process group of the runtime's size and group name while Inductor compiles (compile/tp.py).
    with (fake_process_group(tp) if tp > 1 else contextlib.nullcontext("")) as group_name, \
            targets.activate(cpu_target), decode_kernel(attention_op):
        spec = build_spec(cfg, buckets, dtype, tokenizer, TPInfo(0, tp, group_name))
        for r in range(tp):
            tpi = TPInfo(r, tp, group_name) if tp > 1 else SINGLE
            rank_weights = weights if tp == 1 else rank_shard(cfg, weights, r, tp)
            model = build_model(cfg, rank_weights, tpi, max_seq_len=buckets.max_context)
            # Dynamic block-table widths and prefill chunk lengths on the AOTInductor CPU backend alone:
            # the TP step channel sends fixed shapes, and the other backends' graphs are not proven with them.
            programs, reports = _export_rank(model, buckets, names, tdtype, device, pass_list(passes, quant),
                                             f" rank {r}" if tp > 1 else "", log, t_start,
                                             dynamic_tables=backend == "cpu" and tp == 1,
                                             dynamic_tokens=backend == "cpu" and tp == 1 and exact_prefill,
                                             pass_options=pass_options)
            if r == 0:
                pass_reports = reports
            uses_kernels = uses_kernels or kernels.uses_kernels(programs.values())
            graphs_dir = staging / f"rank{r}" / "graphs"
            options = TP_COMPILE_OPTIONS if tp > 1 else None
            if r == 0:
                compiled = compile_graphs(programs, graphs_dir, device=backend, progress=progress, options=options)
                base_programs = programs
                if tp > 1:
                    tp_info["collectives"] = {n: count_collectives(ep) for n, ep in programs.items()}
                    for n in compiled:
                        check_outputs(graphs_dir / compiled[n].package)
            else:
                compiled = _reuse_rank0(r, programs, base_programs, ranks[0]["graphs"], staging, graphs_dir,
                                        backend, progress, options, log)
                tp_info.setdefault("reused_rank0_graphs", {})[f"rank{r}"] = sum(
                    1 for g in compiled.values() if g.compile_s == 0.0)
            ranks.append({"weights": collect_weights(programs, compiled), "graphs": compiled})
            graph_s.update({(n if tp == 1 else f"rank{r}/{n}"): round(g.compile_s, 1) for n, g in compiled.items()})
            del model, programs, rank_weights
    if tp > 1:
        decode = next((n for n in names if GraphKey.parse(n).stage == "decode"), None)
        if decode:
            log(f"[tp] collectives per decode step: {tp_info['collectives'][decode]}")
    compile_s = time.perf_counter() - t_start
    info = {"seconds": round(compile_s, 1), "passes": pass_reports, "graph_compile_s": graph_s,
            "lowering": {**_lowering(cpu_target, backend, tdtype, quant),
                         "decode_attention": "kernel" if use_attention_kernel else "graph"}}
    if tp > 1:
        info["tp"] = tp_info
    if uses_kernels:        # the graphs call kernels/ ops: the library built for the target ships with them
        lib = staging / kernels.KERNELS_LIBRARY
        lib.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernels.library_for(cpu_target), lib)
        info["lowering"]["kernels"] = kernels.manifest_entry()
    write_artifact(out, staging, spec, ranks, Path(tokenizer_dir), source or {}, backend, info, target=target)
    return _summary(out, ranks, tp, compile_s, log)


def _check_request(cfg: ModelConfig, backend: str, target: str, tp: int, targets):
    """Refuse what cannot be compiled before any work; -> the CPU target."""
    cpu_target = targets.resolve(target)
    if backend != "cpu" and target != "native":
        raise ValueError(f"TARGET={target} is a CPU target; BACKEND={backend} takes TARGET=native")
    if tp > 1:
        check_tp(cfg, tp)
    if backend == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("BACKEND=cuda needs a visible CUDA device on the compiling machine")
    return cpu_target


def _lowering(cpu_target, backend: str, tdtype, quant: str) -> dict:
    """How the graphs compute, in the manifest's words (the passes' own reports have the details)."""
    low = tdtype in (torch.bfloat16, torch.float16)
    gemm = ("native" if not low or backend != "cpu" or cpu_target.native_bf16 else
            "fp32 from bf16/fp16 storage (target without native bf16: compile/passes/fp32_gemm.py)")
    return {"quant": quant, "gemm_compute": gemm}


def _fresh_staging(out: Path) -> Path:
    """The directory the artifact is built in, beside `out` (renamed into place when complete)."""
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        import shutil
        shutil.rmtree(staging)
    (staging / "rank0" / "graphs").mkdir(parents=True)
    return staging


def _export_rank(model, buckets: Buckets, names: list[str], tdtype, device, passes, where: str, log,
                 t_start: float, dynamic_tables: bool = False, dynamic_tokens: bool = False,
                 pass_options: dict | None = None) -> tuple[dict, dict]:
    """Every bucket graph of one rank's model, exported and passed: -> (programs, pass reports)."""
    programs, reports = {}, {}
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        ep = export_graph(model, buckets, name, tdtype, device, dynamic_tables=dynamic_tables,
                          dynamic_tokens=dynamic_tokens)
        nodes_before = _count_calls(ep)
        # One RoPE table sized for the largest context, shared by every graph of the artifact.
        options = {**(pass_options or {})}
        options["rope_table"] = {"max_context": buckets.max_context, **options.get("rope_table", {})}
        ep, report = run_passes(ep, passes, options)
        programs[name] = ep
        reports[name] = {"ops_before": nodes_before, "ops_after": _count_calls(ep), "passes": report}
        log(f"[export{where} {i}/{len(names)}] {name}: {nodes_before} -> {_count_calls(ep)} ops "
            f"in {time.perf_counter() - t0:.1f} s (elapsed {time.perf_counter() - t_start:.0f} s)")
    return programs, reports


def _reuse_rank0(r: int, programs: dict, base_programs: dict, rank0_graphs: dict, staging: Path, graphs_dir: Path,
                 backend: str, progress, options, log) -> dict:
    """Rank r's graphs: rank 0's packages wherever the programs agree, a compile of its own elsewhere."""
    compiled = {}
    for name, ep in programs.items():
        reused = reuse_compiled(rank0_graphs[name], staging / "rank0" / "graphs", base_programs[name], ep, graphs_dir)
        if reused is None:      # a program that differs from rank 0's: compile it for this rank
            log(f"[aoti] rank {r} {name}: program differs from rank 0's, compiling it")
            reused = compile_graphs({name: ep}, graphs_dir, device=backend, progress=progress,
                                    options=options)[name]
            check_outputs(graphs_dir / reused.package)
        compiled[name] = reused
    return compiled


def _summary(out: Path, ranks: list, tp: int, compile_s: float, log) -> dict:
    size = dir_size(out)
    wbytes = sum(t.numel() * t.element_size() for r in ranks for t in r["weights"].values())
    per_rank = f" x {tp} ranks" if tp > 1 else ""
    log(f"[done] {out}: {len(ranks[0]['graphs'])} graphs{per_rank}, {size / 1e6:.1f} MB "
        f"({wbytes / 1e6:.1f} MB weights), compiled in {compile_s:.0f} s")
    return {"out": str(out), "graphs": len(ranks[0]["graphs"]), "bytes": size, "weight_bytes": wbytes,
            "seconds": compile_s}


def _count_calls(ep) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function")
