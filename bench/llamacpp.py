"""The same sweep in llama.cpp (llama-cpp-python's low-level API) on the artifact's LLM as GGUF:

    python -m internvl_aot.bench.llamacpp SPEC.json ROWS.jsonl      (started by internvl-bench)

Inputs are exactly ours: the prompt token ids our worker saved, image-context ids included.
llama.cpp runs the LLM only: at the image positions it embeds the <IMG_CONTEXT> token id where
we and transformers scatter the vision features in, so the LLM work per token is the same
(the vision tower is not part of this comparison; the TTFT ratio against llama.cpp compares
our whole first token, vision included, with its prefill alone).

Per batch size B, after one warm-up request:
- prefill: each of the B sequences gets the prompt in chunks of `n_batch` (512, our prefill
  bucket) tokens, one sequence after the other, logits for the last position only; a sequence's
  time to first token is the end of its prefill plus its greedy argmax (as our scheduler admits
  one sequence per step);
- decode: N - 1 steps, each one llama_decode over a batch of B tokens (one per sequence, its own
  seq_id and position), then the argmax of every sequence's logits (greedy, EOS ignored: the
  logits are read directly, no sampler chain); the step's duration is one per-token latency.
The KV cache is one unified pool (kv_unified) of B x (prompt + N) tokens, cleared between rows.

Token agreement (`match_tokens`): with an image the two engines get different inputs at the
image positions, so the benchmark's prompt cannot be compared token for token. Instead our
engine first generates N greedy tokens for the text-only prompt (`--ours-text`, its own process),
and each llama.cpp worker runs the same prompt ids greedy: `match_tokens` of a llama.cpp row is
the leading tokens equal to ours there (with an fp32 artifact and f32 GGUF, all N expected).

No torch in the llama.cpp process (its import would add to llama.cpp's peak RSS): bench/measure.py's
peak-memory and step statistics are torch-free at import.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from .measure import PeakMemory, common_prefix, step_stats
from .worker import run_recorded

N_BATCH = 512


# ---------------------------------------------------------------- llama.cpp

class LlamaCpp:
    """One model and one context, driven token id by token id."""

    def __init__(self, gguf_path: str, threads: int, n_ctx: int, n_seq: int, extra_bufts: bool = True):
        import llama_cpp as L
        self.L = L
        L.llama_backend_init()
        self._log = L.llama_log_callback(self._on_log)   # keep a reference: C holds the pointer
        L.llama_log_set(self._log, None)
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = extra_bufts   # False: no AMX / REPACK weight layouts (see bench/cli.py)
        self.model = L.llama_model_load_from_file(gguf_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}: {self.last_error}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, N_BATCH, N_BATCH, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context: {self.last_error}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(max(N_BATCH, n_seq), 0, 1)
        self.flash_attn = int(cp.flash_attn_type)

    last_error = ""

    def _on_log(self, level, text, _user):
        if level == 4:  # GGML_LOG_LEVEL_ERROR (5, CONT, continues any level: progress dots)
            msg = text.decode(errors="replace").strip()
            if msg:
                self.last_error = msg
                print(f"[llama.cpp] {msg}", file=sys.stderr)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.mem, True)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, pos, seq_id, want logits)."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}: {self.last_error}")

    def argmax(self, i: int) -> int:
        p = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).argmax())

    def prefill(self, ids: list[int], seq: int) -> int:
        """The prompt into sequence `seq`; -> the greedy first token."""
        for start in range(0, len(ids), N_BATCH):
            chunk = ids[start:start + N_BATCH]
            last = start + len(chunk) == len(ids)
            self._decode([(t, start + j, seq, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])
        return self.argmax(-1)

    def decode_step(self, tokens: list[int], pos: int) -> list[int]:
        """One token for each sequence 0..B-1, all at position `pos`; -> the next greedy tokens."""
        self._decode([(t, pos, s, True) for s, t in enumerate(tokens)])
        return [self.argmax(i) for i in range(len(tokens))]


def run_batch(llm: LlamaCpp, prompt: list[int], b: int, n: int) -> dict:
    llm.clear()
    t0 = time.perf_counter()
    last, ttfts = [], []
    for s in range(b):
        last.append(llm.prefill(prompt, s))
        ttfts.append(time.perf_counter() - t0)
    out0 = [last[0]]
    steps = []
    for i in range(n - 1):
        t = time.perf_counter()
        last = llm.decode_step(last, len(prompt) + i)
        steps.append(time.perf_counter() - t)
        out0.append(last[0])
    total = time.perf_counter() - t0
    return {"batch_size": b, "input_tokens": len(prompt), "output_tokens": n,
            "ttft_s": round(sum(ttfts) / b, 6), "ttft_max_s": round(max(ttfts), 6),
            "prefill_tok_s": round(b * len(prompt) / ttfts[-1], 2),
            **step_stats(steps, [b] * len(steps)), "e2e_tok_s": round(b * n / total, 3),
            "total_s": round(total, 3), "decode_steps": len(steps), "output_ids": out0}


def ours_text(spec: dict) -> dict:
    """Our engine's greedy tokens for the text-only prompt (run in its own process: it needs torch)."""
    from ..runtime.engine import Engine, Request
    from ..runtime.sampler import SamplingParams
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    engine = Engine.from_artifact(spec["artifact"], kv_cache_gb=spec.get("kv_cache_gb"),
                                  skip_verify=spec.get("skip_verify", False))
    n = spec["output_tokens"]
    res = engine.generate([Request(prompt=spec["prompt"], params=SamplingParams(max_new_tokens=n, ignore_eos=True))])
    return {"prompt_ids": list(res[0].prompt_token_ids), "output_ids": list(res[0].output_token_ids)}


def greedy(llm: LlamaCpp, prompt: list[int], n: int) -> list[int]:
    llm.clear()
    out = [llm.prefill(prompt, 0)]
    for i in range(n - 1):
        out += llm.decode_step(out[-1:], len(prompt) + i)
    return out


def run(spec: dict, emit) -> None:
    import llama_cpp

    inputs = json.loads(open(spec["inputs_json"]).read())
    prompt, n = inputs["prompt_ids"], spec["output_tokens"]
    manifest = json.loads(open(os.path.join(spec["artifact"], "manifest.json")).read())
    cfg = manifest["model"]["config"]["llm"]
    threads = spec.get("threads") or os.cpu_count()
    n_seq = max(spec["batch_sizes"])
    text = json.loads(open(spec["ours_text"]).read()) if spec.get("ours_text") else None
    longest = max(len(prompt), len(text["prompt_ids"]) if text else 0)
    n_ctx = -(-n_seq * (longest + n) // 256) * 256
    mem = PeakMemory()
    t0 = time.perf_counter()
    extra = spec.get("extra_bufts", True)
    llm = LlamaCpp(spec["gguf"], threads, n_ctx, n_seq, extra_bufts=extra)
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    run_batch(llm, prompt, 1, 2)  # warm-up, as for ours
    warmup_s = time.perf_counter() - t
    match = None
    if text:
        theirs = greedy(llm, text["prompt_ids"], len(text["output_ids"]))
        match = common_prefix(text["output_ids"], theirs)
        print(f"[bench] {spec['engine']}: text-only prompt ({len(text['prompt_ids'])} ids), greedy tokens equal to "
              f"ours: {match} of {len(theirs)}", file=sys.stderr, flush=True)
    kv_mb = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * 2 * n_ctx / 1e6  # f16 K and V
    base = {"engine": spec["engine"], "dtype": spec["gguf_type"], "threads": threads, "load_s": round(load_s, 2),
            "warmup_s": round(warmup_s, 2), "rss_mode": mem.mode,
            "weights_mb": round(os.path.getsize(spec["gguf"]) / 1e6, 1), "kv_mb": round(kv_mb, 1),
            "num_tiles": sum(inputs["num_tiles"]), "llama_cpp_python": llama_cpp.__version__,
            "flash_attn_type": llm.flash_attn, "match_tokens_text": match, "extra_bufts": extra,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
    for b in spec["batch_sizes"]:
        mem.reset()
        row = run_batch(llm, prompt, b, n)
        row.update(base, peak_rss_mb=mem.rss_mb(), peak_gpu_mb=None)
        emit(row)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "--ours-text":
        spec = json.loads(open(argv[1]).read())
        with open(argv[2], "w") as f:
            json.dump(ours_text(spec), f)
        return 0
    spec_path, rows_path = argv
    spec = json.loads(open(spec_path).read())

    return run_recorded(rows_path, spec["engine"], lambda emit: run(spec, emit),
                        detail=lambda row: f" ({row['prefill_tok_s']} prompt tok/s)")


if __name__ == "__main__":
    sys.exit(main())
