"""Where a decode step's time goes, for one artifact and batch size:

    python -m internvl_aot.bench.profile --artifact DIR --batch 1 --steps 16

Prints, per decode step (mean over the steps after the first):
- step: the whole scheduler step (input prep + graph + sampling + bookkeeping);
- graph: the compiled decode graph alone;
- linears (eager): the same weight matrices multiplied by a [B, hidden] activation with
  torch's own `F.linear` (the ATen mm the AOTInductor graph calls too), one after the other:
  what the linear layers alone cost at this batch size, and the bandwidth they reach;
- roofline: the weight bytes at the measured copy bandwidth.
Run it under `perf record -g -p PID` (it prints its PID) for a symbol-level profile.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def linear_weights(weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every 2-D language-model weight a decode step multiplies by (not the embedding)."""
    return [t for k, t in weights.items() if k.startswith("language_model.") and t.dim() == 2
            and "embed_tokens" not in k and not k.startswith("_aoti")]


def time_linears(mats: list[torch.Tensor], batch: int, repeats: int = 5) -> float:
    xs = {m.shape[1]: torch.randn(batch, m.shape[1], dtype=m.dtype) for m in mats}
    with torch.inference_mode():
        for m in mats:  # page everything in
            F.linear(xs[m.shape[1]], m)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m in mats:
                F.linear(xs[m.shape[1]], m)
            best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m internvl_aot.bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="text prompt length (synthetic text)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to sleep before decoding (attach perf)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..runtime.buckets import GraphKey
    from ..runtime.engine import Engine, Request
    from ..runtime.sampler import SamplingParams
    from ..runtime.sequence import Status
    from .measure import measure_bandwidth

    print(f"pid {os.getpid()}", flush=True)
    bw = measure_bandwidth()
    engine = Engine.from_artifact(args.artifact, kv_cache_gb=args.kv_cache_gb, skip_verify=True)
    graph_s: list[float] = []
    for name, g in list(engine.runner.graphs.items()):
        if GraphKey.parse(name).stage == "decode":
            def timed(*a, _g=g):
                t0 = time.perf_counter()
                out = _g(*a)
                graph_s.append(time.perf_counter() - t0)
                return out
            engine.runner.graphs[name] = timed
    params = SamplingParams(max_new_tokens=args.steps + 1, ignore_eos=True)
    prompt = ("x" * args.prompt_tokens)[: max(1, args.prompt_tokens - 40)]
    seqs = [engine.make_sequence(Request(prompt=prompt, params=params)) for _ in range(args.batch)]
    for s in seqs:
        engine.scheduler.add(s)
    records = []
    while engine.scheduler.waiting or engine.scheduler.prefilling:    # prefill work runs before decoding
        engine.step()
    if args.wait:
        print(f"prefilled; decoding in {args.wait} s", flush=True)
        time.sleep(args.wait)
    while any(s.status is not Status.FINISHED for s in seqs):
        records.append(engine.step())
    step_s = [r.seconds for r in records if r.kind == "decode"]
    steps, graphs = step_s[1:], graph_s[1:]
    from ..runtime import weights_file
    from pathlib import Path
    weights = weights_file.read(Path(args.artifact) / engine.manifest["ranks"][0]["weights"])
    mats = linear_weights(weights)
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    lin = time_linears(mats, args.batch)
    ms = lambda xs: 1000 * sum(xs) / max(1, len(xs))  # noqa: E731
    print(f"batch {args.batch}, context ~{len(seqs[0])}, KV pool {engine.pool.nbytes / 1e9:.2f} GB, "
          f"threads {torch.get_num_threads()}")
    print(f"step            {ms(steps):9.1f} ms")
    print(f"graph           {ms(graphs):9.1f} ms")
    print(f"linears (eager) {1000 * lin:9.1f} ms  ({len(mats)} matrices, {nbytes / 1e9:.2f} GB, "
          f"{nbytes / lin / 1e9:.1f} GB/s)")
    print(f"roofline        {1000 * nbytes / (bw['copy_gbs'] * 1e9):9.1f} ms  (weights at copy {bw['copy_gbs']} GB/s, "
          f"read {bw['read_gbs']} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
