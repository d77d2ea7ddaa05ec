"""The sweep over a compiled artifact: one image, B identical requests, N tokens each (EOS ignored).

Timing comes from the engine's step records: every `Engine.step()` is one vision chunk, one
prefill chunk or one decode step (one token for every running sequence), so the duration of each
decode step is one per-token latency, sampling and Python overhead included. Time to first token is each sequence's first
token minus the moment the batch was submitted (tiling and tokenization included); `vision_s` and `prefill_s` are the
batch's vision and prefill steps, and `prefill_tok_s` its prompt tokens over the latter (the LLM's prompt rate, the
number llama.cpp's rows report).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .measure import PeakMemory, step_stats


def run_batch(engine, req, batch: int) -> dict:
    """One row: `batch` copies of `req` submitted at once, run to the end."""
    from ..runtime.sequence import Status

    steps, tokens = [], []
    spent = {"vision": 0.0, "prefill": 0.0}     # seconds of the batch's vision and prefill steps
    t0 = time.perf_counter()
    seqs = [engine.make_sequence(req) for _ in range(batch)]
    for s in seqs:
        engine.scheduler.add(s)
    while any(s.status is not Status.FINISHED for s in seqs):
        rec = engine.step()
        if rec.kind == "decode":
            steps.append(rec.seconds)
            tokens.append(rec.new_tokens)
        else:
            spent[rec.kind] += rec.seconds
    t_end = max(s.t_finish for s in seqs)
    n_out = [len(s.output_ids) for s in seqs]
    ttfts = [s.t_first_token - t0 for s in seqs]
    total = t_end - t0
    return {"batch_size": batch, "input_tokens": len(seqs[0].prompt_ids), "output_tokens": n_out[0],
            "num_tiles": sum(seqs[0].num_tiles),
            # microseconds: a tiny model's prefill takes a few ms, and the test checks the rate against these to 1%
            "ttft_s": round(sum(ttfts) / batch, 6), "ttft_max_s": round(max(ttfts), 6),
            "vision_s": round(spent["vision"], 6), "prefill_s": round(spent["prefill"], 6),
            # the LLM's prompt rate, as llama.cpp's row reports it (bench/llamacpp.py: all prompt tokens of the batch
            # over its prefill time; image positions included, the vision steps not)
            "prefill_tok_s": round(batch * len(seqs[0].prompt_ids) / spent["prefill"], 2) if spent["prefill"] else None,
            **step_stats(steps, tokens), "e2e_tok_s": round(sum(n_out) / total, 3), "total_s": round(total, 3),
            "decode_steps": len(steps), "output_ids": seqs[0].output_ids,
            "all_same_length": len(set(n_out)) == 1}


def run(spec: dict, emit) -> None:
    from PIL import Image

    from ..runtime.engine import Engine, Request
    from ..runtime.sampler import SamplingParams

    mem = PeakMemory()
    t0 = time.perf_counter()
    engine = Engine.from_artifact(spec["artifact"], kv_cache_gb=spec.get("kv_cache_gb"),
                                  skip_verify=spec.get("skip_verify", False))
    load_s = time.perf_counter() - t0
    manifest = engine.manifest
    weights_mb = (Path(spec["artifact"]) / manifest["ranks"][0]["weights"]).stat().st_size / 1e6
    image = Image.open(spec["image"]).convert("RGB")
    n = spec["output_tokens"]
    req = Request(prompt=spec["prompt"], images=[image], max_tiles=spec["max_tiles"],
                  params=SamplingParams(max_new_tokens=n, ignore_eos=True))
    seq = engine.make_sequence(req)
    torch.save({"prompt_ids": seq.prompt_ids, "pixel_values": seq.pixel_values, "num_tiles": seq.num_tiles},
               spec["inputs"])
    t0 = time.perf_counter()
    warm = Request(prompt=spec["prompt"], images=[image], max_tiles=spec["max_tiles"],
                   params=SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.generate([warm])
    warmup_s = time.perf_counter() - t0
    quant = manifest.get("compile", {}).get("lowering", {}).get("quant", "none")
    base = {"engine": "ours", "dtype": engine.spec.dtype, "quant": quant, "threads": torch.get_num_threads(),
            "load_s": round(load_s, 2), "warmup_s": round(warmup_s, 2), "rss_mode": mem.mode,
            "weights_mb": round(weights_mb, 1), "kv_mb": round(engine.pool.nbytes / 1e6, 1),
            "max_batch_bucket": engine.runner.max_batch}
    for b in spec["batch_sizes"]:
        mem.reset()
        row = run_batch(engine, req, b)
        row.update(base, peak_rss_mb=mem.rss_mb(), peak_gpu_mb=mem.gpu_mb())
        emit(row)

