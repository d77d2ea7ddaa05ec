#!/usr/bin/env python3
"""Accuracy of the demo model (models/internvl-demo) on held-out synthetic questions: the compiled
artifact and the eager graphs (compile/eager.py, the same weights uncompiled), each answering every
question greedily, batched through `Engine.generate`. Prints exact-match accuracy per question kind,
and how often the artifact and the eager model give the same answer.

    .venv/bin/python tools/demo_accuracy.py                        # compiles the demo artifact if needed
    .venv/bin/python tools/demo_accuracy.py --artifact artifacts/internvl-demo-tp1-cpu-fp32 --n 300

The questions come from tools/demo_vqa.py with --seed (default 2024); the training script uses
seed 0 for training data and 10000 + seed for its own progress checks, so these are held out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import demo_vqa  # noqa: E402

from internvl_aot.compile.buckets import Buckets  # noqa: E402
from internvl_aot.compile.checkpoint import load_checkpoint  # noqa: E402
from internvl_aot.runtime.engine import Engine, Request  # noqa: E402
from internvl_aot.runtime.sampler import SamplingParams  # noqa: E402

CHECKPOINT = ROOT / "models" / "internvl-demo"
ARTIFACT = ROOT / "artifacts" / "internvl-demo-tp1-cpu-fp32"
BUCKETS = "vision=1;prefill=512;batch=1,8;context=1024;block_size=32"


def answer_all(engine: Engine, data, batch: int) -> tuple[list[str], float]:
    params = SamplingParams(max_new_tokens=8)
    out, t0 = [], time.perf_counter()
    for i in range(0, len(data), batch):
        reqs = [Request(prompt=q, images=[im], params=params) for im, q, _, _ in data[i:i + batch]]
        out += [r.text.strip() for r in engine.generate(reqs)]
    return out, time.perf_counter() - t0


def report(name: str, answers: list[str], data) -> dict:
    per_kind: dict[str, list[int]] = {}
    for a, (_, _, want, kind) in zip(answers, data):
        r = per_kind.setdefault(kind, [0, 0])
        r[0] += a == want
        r[1] += 1
    right = sum(r[0] for r in per_kind.values())
    kinds = "  ".join(f"{k} {r[0]}/{r[1]}" for k, r in per_kind.items())
    print(f"{name:9s} exact match {right}/{len(data)} = {100 * right / len(data):.1f}%   ({kinds})")
    return {"correct": right, "n": len(data), "per_kind": {k: r[0] / r[1] for k, r in per_kind.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(CHECKPOINT))
    ap.add_argument("--artifact", default=str(ARTIFACT), help="compiled (fp32, CPU) here first if missing")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--batch", type=int, default=8, help="requests per generate() call")
    ap.add_argument("--no-eager", action="store_true", help="only the artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ckpt, art = Path(args.checkpoint), Path(args.artifact)
    cfg, weights = load_checkpoint(ckpt)
    if not (art / "manifest.json").is_file():
        from internvl_aot.compile.pipeline import compile_model
        print(f"compiling {ckpt} -> {art} (buckets {BUCKETS})")
        compile_model(cfg, weights, ckpt, art, Buckets.parse(BUCKETS), dtype="fp32", backend="cpu",
                      source={"path": str(ckpt)}, log=lambda m: None)
        cfg, weights = load_checkpoint(ckpt)

    data = demo_vqa.questions(args.seed, args.n)
    print(f"{len(data)} questions (seed {args.seed}), {len(demo_vqa.KINDS)} kinds; artifact {art}")
    engine = Engine.from_artifact(art)
    got, secs = answer_all(engine, data, args.batch)
    summary = {"artifact": report("artifact", got, data)}
    summary["artifact"]["seconds"] = round(secs, 1)
    if not args.no_eager:
        from internvl_aot.compile.eager import eager_engine
        eager = eager_engine(cfg, weights, ckpt, Buckets.parse(BUCKETS), dtype="fp32")
        ref, esecs = answer_all(eager, data, args.batch)
        summary["eager"] = report("eager", ref, data)
        summary["eager"]["seconds"] = round(esecs, 1)
        same = sum(a == b for a, b in zip(got, ref))
        summary["agreement"] = same / len(data)
        print(f"agreement artifact vs eager: {same}/{len(data)} = {100 * same / len(data):.1f}%")
        for (_, q, want, _), a, b in zip(data, got, ref):
            if a != b:
                print(f"  differs: {q!r}: artifact {a!r}, eager {b!r} (right: {want!r})")
    print(f"time: artifact {secs:.1f} s" + ("" if args.no_eager else f", eager {summary['eager']['seconds']} s"))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
