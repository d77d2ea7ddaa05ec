"""The same sweep in transformers: InternVLForConditionalGeneration with the artifact's weights.

Inputs are exactly ours: the prompt token ids and pixel tiles our worker saved (so tiling,
template and tokenizer cannot differ), the batch is B copies of them, `generate` runs greedy
with EOS disabled for exactly N new tokens.

Engines:
- `transformers`: eager PyTorch, SDPA attention, `generate` with its default (dynamic) KV cache.
- `transformers-compile`: `cache_implementation="static"` + torch.compile of the decode
  forward (transformers' own auto-compile path; on CPU it must be asked for with
  `CompileConfig._compile_all_devices`; mode "default" on CPU, "reduce-overhead", i.e. CUDA
  graphs, on CUDA). Two short warm-up generates with the same batch size and static cache
  length come first and pay for the compilation (`warmup_s`).

Timing: a LogitsProcessor stamps the clock every time generate has new logits, i.e. once
after prefill (time to first token) and once after each decode forward; the gaps are the
per-token latencies (forward + token selection + stopping checks).
"""
from __future__ import annotations

import time

import torch

from ..runtime.manifest import DTYPES
from .measure import PeakMemory, kv_bytes, step_stats



class _Clock:
    """A LogitsProcessor that records when each step's logits arrive (and changes nothing)."""

    def __init__(self, sync: bool):
        self.times: list[float] = []
        self.sync = sync

    def __call__(self, input_ids, scores):
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def generate(model, ids: torch.Tensor, pixels: torch.Tensor, n: int, extra: dict):
    """-> (first sequence's new token ids, logits timestamps, start, end, new tokens per sequence)."""
    from transformers import LogitsProcessorList
    clock = _Clock(ids.device.type == "cuda")
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]), **extra)
    t_end = time.perf_counter()
    return out[0, ids.shape[1]:].tolist(), clock.times, t0, t_end, out.shape[1] - ids.shape[1]


def run(spec: dict, emit) -> None:
    import json
    from pathlib import Path

    from .hf_weights import build_hf_model

    engine_name, dtype_name = spec["engine"], spec["hf_dtype"]
    device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    mem = PeakMemory()
    manifest = json.loads((Path(spec["artifact"]) / "manifest.json").read_text())
    llm = manifest["model"]["config"]["llm"]
    t0 = time.perf_counter()
    model = build_hf_model(Path(spec["artifact"]), manifest, DTYPES[dtype_name], "sdpa", device)
    load_s = time.perf_counter() - t0
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, None
    gc.temperature = gc.top_p = gc.top_k = None
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6

    inputs = torch.load(spec["inputs"])
    prompt = torch.tensor([inputs["prompt_ids"]], device=device)
    tiles = inputs["pixel_values"].to(device=device, dtype=DTYPES[dtype_name])
    n = spec["output_tokens"]
    extra = {}
    if engine_name == "transformers-compile":
        from transformers import CompileConfig
        cc = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if device == "cuda" else "default")
        cc._compile_all_devices = True
        extra = {"cache_implementation": "static", "compile_config": cc}

    base = {"engine": engine_name, "dtype": dtype_name, "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
            "rss_mode": mem.mode, "weights_mb": round(weights_mb, 1)}
    warmup_s = None
    if engine_name == "transformers":  # one short warm-up, as for ours
        t = time.perf_counter()
        generate(model, prompt, tiles, 2, {})
        warmup_s = round(time.perf_counter() - t, 2)
    for b in spec["batch_sizes"]:
        ids = prompt.repeat(b, 1)
        pixels = tiles.repeat(b, 1, 1, 1)
        if engine_name == "transformers-compile":
            # One static cache length for every call, so the short warm-ups (the first compiles
            # the decode step for this batch size, the second runs it once more) leave nothing
            # to recompile in the measured run.
            extra["max_cache_len"] = prompt.shape[1] + n
            t = time.perf_counter()
            for _ in range(2):
                generate(model, ids, pixels, 3, extra)
            warmup_s = round(time.perf_counter() - t, 2)
        mem.reset()
        out_ids, times, t_start, t_end, n_out = generate(model, ids, pixels, n, extra)
        steps = [b2 - a for a, b2 in zip(times, times[1:])]
        total = t_end - t_start
        row = {"batch_size": b, "input_tokens": prompt.shape[1], "output_tokens": n_out,
               "num_tiles": sum(inputs["num_tiles"]),
               "ttft_s": round(times[0] - t_start, 4), "ttft_max_s": round(times[0] - t_start, 4),
               **step_stats(steps, [b] * len(steps)), "e2e_tok_s": round(b * n_out / total, 3),
               "total_s": round(total, 3), "decode_steps": len(steps), "output_ids": out_ids,
               "kv_mb": round(kv_bytes(llm, dtype_name, b * (prompt.shape[1] + n_out)) / 1e6, 1),
               "warmup_s": warmup_s}
        row.update(base, peak_rss_mb=mem.rss_mb(), peak_gpu_mb=mem.gpu_mb())
        emit(row)

