"""What the benchmark measures, and how: bandwidth, peak memory, step statistics, roofline.

Definitions (also in docs/performance.md):
- copy bandwidth (`copy_gbs`): STREAM "Copy" convention, 2 x bytes / seconds (each byte read
  once and written once) for `dst.copy_(src)` over two 256 MiB fp32 buffers (well past any L3),
  with the thread count the engines use, best of several runs. `read_gbs` (bytes / seconds of
  `src.sum()`) is recorded alongside; decode mostly reads, so read bandwidth is the tighter bound.
- roofline of a decode step: the bytes the step must read (the LLM's weights except the token
  embedding, of which only B rows are read, plus the K/V of every sequence at its mean context
  length over the run) divided by the copy bandwidth. `roofline_frac` = roofline time / measured
  mean step time (1.0 = running at the copy bandwidth).
- compute roofline of the time to first token: the multiply-adds of the vision encoder and the
  prompt's prefill (`prefill_flops`: 2 x tokens x each weight matrix, plus attention) divided by the
  box's achievable GEMM rate (`measure_gemm_flops`: a large matmul in each dtype with the engines'
  thread count, best of several; and, for an artifact whose graphs call the kernel library's fp32 GEMM on a
  CPU without native bf16, that op at the same shape: the best of these is the rate). `ttft_compute_frac` =
  that time / measured time to first token (1.0 = every cycle of the first token in GEMMs at the rate a
  plain large matmul reaches).
- peak resident memory: the process's high-water RSS during one row. Linux lets a process reset
  its high-water mark (`echo 5 > /proc/self/clear_refs`), so each row reports its own peak
  (weights resident at that point included). Where that is not possible, ru_maxrss is used and
  the peak is cumulative over the rows (the CSV says which in `rss_mode`).

torch is imported only by the functions that measure with it, so a torch-free benchmark process
(bench/llamacpp.py: a torch import would add to llama.cpp's peak RSS) shares the rest.
"""
from __future__ import annotations

import re
import resource
import sys
import time

MiB = 1 << 20


def _cuda():
    """torch.cuda if torch is loaded in this process and sees a GPU, else None (never imports torch)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


def measure_bandwidth(mib: int = 256, repeats: int = 7) -> dict:
    """{'copy_gbs', 'read_gbs', 'mib', 'threads'} on the CPU with torch's current thread count."""
    import torch
    n = mib * MiB // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    copy_s, read_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        float(src.sum())
        read_s.append(time.perf_counter() - t0)
    nbytes = n * 4
    return {"copy_gbs": round(2 * nbytes / min(copy_s) / 1e9, 2), "read_gbs": round(nbytes / min(read_s) / 1e9, 2),
            "mib": mib, "threads": torch.get_num_threads()}


def measure_gemm_flops(dtypes=("bf16", "fp32"), m: int = 1024, k: int = 2048, n: int = 8192,
                       repeats: int = 5, slow_call_s: float = 2.0, ops: dict | None = None) -> dict:
    """{'gemm_gflops': {dtype: GFLOP/s}} of an [m, k] x [k, n] matmul on the CPU with torch's current
    thread count (2 m k n FLOP a call, best of `repeats`): the rate a large, well-shaped GEMM reaches
    here, which bounds vision and prefill (an LLM MLP-sized matrix; 34 GFLOP a call). A dtype whose 8-row
    probe says a full call would exceed `slow_call_s` is reported at the probe's 8 rows (gemm_rows).
    ops: {name: f(x [m, k] bf16, w [n, k] bf16)} timed at the same shape, reported under `name`: the GEMM an
    artifact's graphs call where it is not torch's (kernels/fp32_gemm.cpp's internvl::linear_fp32)."""
    import torch
    out, used = {}, {}
    for name, f in (ops or {}).items():
        a, w = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16()
        f(a, w)
        best = min(_timed(f, a, w) for _ in range(repeats))
        used[name] = m
        out[name] = round(2 * m * k * n / best / 1e9, 1)
    for name in dtypes:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        b = torch.randn(k, n).to(dt)
        # An 8-row probe first: where the dtype has no fast GEMM (bf16 with oneDNN limited to AVX2 falls to ATen's
        # scalar loop, 0.3-0.4 GFLOP/s) the full shape would take minutes a call; the probe's rate is reported
        # then, and `gemm_rows` says so.
        probe = torch.randn(8, k).to(dt)
        for _ in range(2):                                  # the second call: past oneDNN's primitive creation
            probe_s = _timed(torch.mm, probe, b)
        rows, best = (m, float("inf")) if probe_s * m / 8 < slow_call_s else (8, probe_s)
        if rows == m:
            a = torch.randn(m, k).to(dt)
            torch.mm(a, b)                                  # first call at this shape
            best = min(_timed(torch.mm, a, b) for _ in range(repeats))
        used[name] = rows
        out[name] = round(2 * rows * k * n / best / 1e9, 1)
    return {"gemm_gflops": out, "gemm_shape": [m, k, n], "gemm_rows": used, "threads": torch.get_num_threads()}


def _timed(f, *args) -> float:
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def measure_gpu_bandwidth(mib: int = 1024, repeats: int = 10) -> dict | None:
    import torch
    if not torch.cuda.is_available():
        return None
    n = mib * MiB // 4
    src = torch.ones(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"copy_gbs": round(2 * n * 4 / best / 1e9, 1), "mib": mib, "device": torch.cuda.get_device_name()}


# ---------------------------------------------------------------- peak memory

def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Per-row peak RSS (and CUDA memory): call reset() before a row and read() after it."""

    def __init__(self):
        self.mode = "per_row" if self._try_reset() else "cumulative"

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kb("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.mode == "per_row":
            self._try_reset()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()

    def rss_mb(self) -> float:
        kb = _status_kb("VmHWM") if self.mode == "per_row" else None
        if kb is None:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        return round(kb / 1024, 1)

    @staticmethod
    def gpu_mb() -> float | None:
        cuda = _cuda()
        return None if cuda is None else round(cuda.max_memory_allocated() / MiB, 1)


# ---------------------------------------------------------------- statistics

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def common_prefix(a: list, b: list) -> int:
    """How many leading items of a and b are equal (match_tokens)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def step_stats(step_s: list[float], tokens_per_step: list[int]) -> dict:
    """Decode-step durations (one token per running sequence each) -> per-token latency and throughput."""
    if not step_s:
        return {"decode_ms_mean": None, "decode_ms_p99": None, "decode_tok_s": None}
    total = sum(step_s)
    return {"decode_ms_mean": round(1000 * total / len(step_s), 2),
            "decode_ms_p99": round(1000 * percentile(step_s, 99), 2),
            "decode_tok_s": round(sum(tokens_per_step) / total, 3) if total > 0 else None}


# ---------------------------------------------------------------- roofline

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Weight-only formats: int8 (per-row scales, a rounding error), int4 (half a byte + an fp32 scale per 128)
QUANT_BYTES_PER_WEIGHT = {"int8": 1, "int4": 0.5 + 4 / 128}


def decode_read_bytes(llm: dict, llm_params: int, embed_params: int, dtype: str, batch: int,
                      input_tokens: int, output_tokens: int, quant: str = "none") -> int:
    """Bytes one decode step must read at batch `batch`, averaged over the run's steps.

    llm_params: every language-model weight element (embedding included); the embedding is
    replaced by the `batch` rows a step looks up. Steps 1..N-1 attend over input + i tokens,
    so the mean context is input + N/2. quant="int8": the weights (less the embedding) at one
    byte each (their per-row scales and the norms are a rounding error), the K/V in `dtype`; "int4": half
    a byte and an fp32 scale per 128 (compile/passes/int4_weights.py).
    """
    b = DTYPE_BYTES[dtype]
    hidden = llm["hidden_size"]
    per_weight = QUANT_BYTES_PER_WEIGHT.get(quant, b)
    weights = int((llm_params - embed_params) * per_weight) + batch * hidden * b
    kv_per_token = 2 * llm["num_layers"] * llm["num_kv_heads"] * llm["head_dim"] * b
    mean_ctx = input_tokens + output_tokens / 2
    return int(weights + batch * mean_ctx * kv_per_token)


def prefill_flop_parts(cfg, tiles: int, tokens: int) -> dict:
    """Floating-point operations (2 per multiply-add) to the first token of one request, by part:
    `tiles` ViT tiles (the layers the projector reads; the patch embedding as the matmul it is), the
    projector on their 256 tokens each, and `tokens` prompt tokens through the LLM (every weight
    matrix but the embedding; the output head for one position), attention apart: all heads' QK^T and
    PV over the tile (vision) and over the causal half of the prompt (LLM). cfg: graphs.config.ModelConfig."""
    import math

    from ..compile.checkpoint import canonical_shapes
    from ..graphs.vit import used_vision_layers
    v, l = cfg.vision, cfg.llm
    shapes = canonical_shapes(cfg)
    used = used_vision_layers(v.num_layers, cfg.select_layer)

    def matrices(prefix: str) -> int:
        return sum(math.prod(s) for k, s in shapes.items()
                   if k.startswith(prefix) and k.endswith(".weight") and len(s) >= 2)

    patches = (v.image_size // v.patch_size) ** 2
    vt = patches + 1                                                 # + CLS
    layers = sum(matrices(f"vision_model.encoder.layers.{i}.") for i in range(used))
    head_dim = l.head_dim or l.hidden_size // l.num_heads
    per_tile = int(round(patches * cfg.downsample_ratio ** 2))
    return {"vision_matmul": tiles * 2 * (vt * layers + patches * matrices("vision_model.embeddings.")),
            "vision_attention": tiles * used * 4 * vt * vt * v.hidden_size,
            "projector": 2 * tiles * per_tile * matrices("mlp1."),
            "llm_matmul": 2 * tokens * matrices("language_model.layers.") + 2 * l.vocab_size * l.hidden_size,
            "llm_attention": l.num_layers * 2 * tokens * tokens * l.num_heads * head_dim}


def prefill_flops(cfg, tiles: int, tokens: int) -> int:
    """prefill_flop_parts summed: the compute bound's numerator for the time to first token."""
    return int(sum(prefill_flop_parts(cfg, tiles, tokens).values()))


def kv_bytes(llm: dict, dtype: str, tokens: int) -> int:
    return 2 * llm["num_layers"] * llm["num_kv_heads"] * llm["head_dim"] * DTYPE_BYTES[dtype] * tokens


def sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (tiny test models give tiny fractions)."""
    return float(f"{x:.{digits}g}")


def roofline(read_bytes: int, copy_gbs: float, decode_ms_mean: float | None) -> dict:
    ms = read_bytes / (copy_gbs * 1e9) * 1000
    return {"step_read_mb": sig(read_bytes / 1e6), "roofline_ms": sig(ms),
            "roofline_frac": sig(ms / decode_ms_mean, 3) if decode_ms_mean else None}
