"""checkpoint -> graphs -> export per bucket -> passes -> AOTInductor -> artifact."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..graphs.config import ModelConfig
from ..graphs.model import build_model
from ..runtime.tokenizer import Tokenizer
from .aoti import compile_graphs
from .artifact import collect_weights, dir_size, write_artifact
from .buckets import Buckets
from .export import export_graph
from .passes import run_passes
from .spec import build_spec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compile_model(cfg: ModelConfig, weights: dict, tokenizer_dir: Path, out: Path, buckets: Buckets,
                  dtype: str = "bf16", backend: str = "cpu", tp: int = 1, source: dict | None = None,
                  passes: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    if tp != 1:
        raise NotImplementedError("TP>1 is not implemented yet (tensor-parallel artifacts are a later issue): use TP=1")
    if backend == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("BACKEND=cuda needs a visible CUDA device on the compiling machine")
    t_start = time.perf_counter()
    device = torch.device("cuda" if backend == "cuda" else "cpu")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    spec = build_spec(cfg, buckets, dtype, tokenizer)
    tdtype = DTYPES[dtype]
    weights = {k: (v.to(device=device, dtype=tdtype) if v.is_floating_point() else v.to(device))
               for k, v in weights.items()}
    model = build_model(cfg, weights, max_seq_len=buckets.max_context)
    names = buckets.graph_names()
    log(f"[compile] {cfg.name}: {len(names)} graphs ({', '.join(names)}), dtype {dtype}, backend {backend}")

    out = Path(out)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        import shutil
        shutil.rmtree(staging)
    (staging / "rank0" / "graphs").mkdir(parents=True)

    programs, pass_reports = {}, {}
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        ep = export_graph(model, buckets, name, tdtype, device)
        nodes_before = _count_calls(ep)
        # One RoPE table sized for the largest context, shared by every graph of the artifact.
        ep, report = run_passes(ep, passes, {"rope_table": {"max_context": buckets.max_context}})
        programs[name] = ep
        pass_reports[name] = {"ops_before": nodes_before, "ops_after": _count_calls(ep), "passes": report}
        log(f"[export {i}/{len(names)}] {name}: {nodes_before} -> {_count_calls(ep)} ops "
            f"in {time.perf_counter() - t0:.1f} s (elapsed {time.perf_counter() - t_start:.0f} s)")

    def progress(msg):
        log(f"[aoti] {msg} (elapsed {time.perf_counter() - t_start:.0f} s)")

    compiled = compile_graphs(programs, staging / "rank0" / "graphs", device=backend, progress=progress)
    rank_weights = collect_weights(programs, compiled)
    compile_s = time.perf_counter() - t_start
    info = {"seconds": round(compile_s, 1), "passes": pass_reports,
            "graph_compile_s": {n: round(g.compile_s, 1) for n, g in compiled.items()}}
    write_artifact(out, staging, spec, [{"weights": rank_weights, "graphs": compiled}], Path(tokenizer_dir),
                   source or {}, backend, info)
    size = dir_size(out)
    wbytes = sum(t.numel() * t.element_size() for t in rank_weights.values())
    log(f"[done] {out}: {len(compiled)} graphs, {size / 1e6:.1f} MB ({wbytes / 1e6:.1f} MB weights), "
        f"compiled in {compile_s:.0f} s")
    return {"out": str(out), "graphs": len(compiled), "bytes": size, "weight_bytes": wbytes, "seconds": compile_s}


def _count_calls(ep) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function")
