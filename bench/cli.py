"""internvl-bench: the original system's performance sweep over a compiled artifact.

    internvl-bench --artifact artifacts/internvl2-2b-tp1-cpu-bf16                     # batch 1..10, 256 tokens
    internvl-bench --artifact DIR --batch-sizes 1,8 --output-tokens 32 --compare transformers
    internvl-bench --artifact DIR --compare transformers,transformers-compile --hf-dtype bf16,fp32
    internvl-bench --artifact DIR --batch-sizes 1,4 --compare llama.cpp --llamacpp-types f16,q8_0 --gguf-dir build/gguf

One image, B identical requests submitted together, N output tokens each (EOS ignored, greedy).
Writes OUT/benchmark.csv (one row per engine and batch size) and OUT/benchmark.json (the rows
plus the machine, versions, bandwidth and command), and prints the table. Every engine runs in
its own subprocess, one after the other, so each row's peak memory is that engine's own.
Column definitions: docs/performance.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .background import OMP_WAIT_CHOICES

COLUMNS = ["engine", "dtype", "quant", "batch_size", "input_tokens", "output_tokens", "num_tiles",
           "ttft_s", "ttft_max_s", "vision_s", "prefill_s", "prefill_tok_s",
           "decode_ms_mean", "decode_ms_p99", "decode_tok_s", "e2e_tok_s", "total_s",
           "peak_rss_mb", "peak_gpu_mb", "weights_mb", "kv_mb", "rss_over_weights_kv",
           "step_read_mb", "copy_gbs", "roofline_ms", "roofline_frac", "ttft_tflop", "gemm_gflops", "ttft_compute_frac",
           "match_tokens", "ratio_ttft", "ratio_prefill_tok_s", "ratio_decode_tok_s", "ratio_e2e_tok_s", "ratio_peak_rss",
           "threads", "load_s", "warmup_s", "rss_mode", "error"]
ENGINES = ("transformers", "transformers-compile", "llama.cpp")
LLAMACPP_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # bench/gguf_export.TYPES (not imported: it needs gguf)
# Bytes per weight of each GGUF type, for the roofline (q8_0: 32 int8 + one f16 scale per block; q4_0: 16 bytes of nibbles + one f16 scale).
GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
DEFAULT_PROMPT = "Please describe the image in detail."


def _dtype_label(row: dict) -> str:
    """bf16, or bf16+int8 / bf16+int4 for a QUANT=int8 / int4 artifact (weights int8 / int4, activations bf16)."""
    quant = row.get("quant", "none")
    return row["dtype"] + ("" if quant in (None, "none") else f"+{quant}")


def parse_batch_sizes(text: str) -> list[int]:
    """'1-10', '1,8', '1-4,8' -> sorted unique positive ints."""
    out = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if a < 1 or b < a:
            raise ValueError(f"bad batch size range {part!r}")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("no batch sizes")
    return sorted(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="internvl-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="compiled artifact directory")
    ap.add_argument("--batch-sizes", default="1-10", help="e.g. 1-10 (default, the original sweep), 1,8")
    ap.add_argument("--output-tokens", type=int, default=256, help="new tokens per sequence (EOS ignored)")
    ap.add_argument("--compare", default="", help=f"comma-separated: {', '.join(ENGINES)} (default: none)")
    ap.add_argument("--hf-dtype", default=None,
                    help="dtypes for the transformers runs, e.g. bf16,fp32 (default: the artifact's)")
    ap.add_argument("--llamacpp-types", default="f16,q8_0",
                    help=f"GGUF weight types for --compare llama.cpp, from {','.join(LLAMACPP_TYPES)} (default f16,q8_0)")
    ap.add_argument("--gguf-dir", default=None,
                    help="keep the GGUF files here and reuse them while the artifact's weights are unchanged "
                         "(default: a temporary directory, deleted at the end)")
    ap.add_argument("--image", default=None, help="the image (default: a synthetic 640x480 picture)")
    ap.add_argument("--max-tiles", type=int, default=6, help="tiles per image (default 6; a thumbnail is added)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--out", default=".", help="directory for benchmark.csv and benchmark.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every engine (default: torch's)")
    ap.add_argument("--background-load", type=int, default=0,
                    help="busy processes beside the engines for the whole run (a shared box; bench/background.py)")
    ap.add_argument("--background-nice", type=int, default=0, help="their nice level (default 0; 19: polite)")
    ap.add_argument("--omp-wait", default=None, choices=list(OMP_WAIT_CHOICES),
                    help="OpenMP wait policy of the engine processes (default: the environment's; bench/background.py)")
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="our KV pool (default: sized to the buckets)")
    ap.add_argument("--skip-verify", action="store_true", help="skip the sha256 check of the artifact")
    ap.add_argument("--device", default=None, help="device for the transformers runs (default: cuda if present)")
    return ap.parse_args(argv)


def synthetic_image(path: Path, width: int = 640, height: int = 480) -> Path:
    """A deterministic picture with structure at every scale (gradients, stripes, noise)."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.RandomState(0)
    r = 127 + 127 * np.sin(x / 23.0) * np.cos(y / 37.0)
    g = 255 * x / width
    b = 255 * ((x // 40 + y // 40) % 2) * 0.6 + rng.rand(height, width) * 100
    img = np.stack([r, g, b], -1).clip(0, 255).astype("uint8")
    Image.fromarray(img).save(path)
    return path


def machine_info() -> dict:
    import torch
    from ..runtime.manifest import cpu_isa
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "isa": cpu_isa()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_gb"] = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_worker(spec: dict, work: Path, tag: str, module: str = "internvl_aot.bench.worker") -> list[dict]:
    spec_path, rows_path = work / f"{tag}.spec.json", work / f"{tag}.rows.jsonl"
    spec_path.write_text(json.dumps(spec))
    rows_path.write_text("")
    proc = subprocess.run([sys.executable, "-m", module, str(spec_path), str(rows_path)])
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    if proc.returncode != 0 and not any("error" in r for r in rows):
        rc = proc.returncode
        why = (f"worker killed by signal {-rc}" + (" (SIGKILL: out of memory?)" if rc == -9 else "")
               if rc < 0 else f"worker exited with status {rc}")
        rows.append({"error": why + f" after {len(rows)} of {len(spec['batch_sizes'])} rows"})
    for r in rows:
        r.setdefault("engine", spec["engine"])
        r.setdefault("dtype", spec.get("hf_dtype") or spec.get("dtype"))
    return rows


def llamacpp_missing(types: list[str]) -> str | None:
    """Why --compare llama.cpp cannot run here (None: it can). Checked before any engine runs."""
    import importlib.util
    bad = [t for t in types if t not in LLAMACPP_TYPES]
    if bad or not types:
        return f"unknown --llamacpp-types {bad}; known: {', '.join(LLAMACPP_TYPES)}"
    missing = [m for m, pkg in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf"))
               if importlib.util.find_spec(m) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed; it is optional and never in CI: build llama.cpp natively "
                "with CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install -e '.[llamacpp]' (10-20+ minutes on 2 cores)")
    return None


def gguf_file(art: Path, manifest: dict, qtype: str, gguf_dir: Path) -> tuple[Path | None, dict]:
    """The artifact's LLM as GGUF `qtype` in gguf_dir: reused if written from the same weights file
    (its sha256 in the manifest), else written by bench/gguf_export.py in a subprocess (it holds
    the weights in memory while converting). -> (path or None, {'seconds', 'reused' or 'error'})."""
    weights = manifest["ranks"][0]["weights"]
    key = {"artifact": str(art.resolve()), "weights": weights, "sha256": manifest.get("files", {}).get(weights),
           "size": (art / weights).stat().st_size, "type": qtype}
    path = gguf_dir / f"{manifest['model']['name']}-{art.name}-{qtype}.gguf"
    stamp = path.with_name(path.name + ".json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == key:
        print(f"[bench] reusing {path}", file=sys.stderr)
        return path, {"reused": True}
    gguf_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "internvl_aot.bench.gguf_export", "--artifact", str(art),
                           "--out", str(path), "--type", qtype], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return None, {"error": f"GGUF export ({qtype}) failed with status {proc.returncode}"}
    stamp.write_text(json.dumps(key))
    return path, {"seconds": round(time.perf_counter() - t0, 1)}


def run_llamacpp(base: dict, art: Path, work: Path, types: list[str], gguf_dir: Path) -> list[dict]:
    """llama.cpp rows, one GGUF type after the other, on our saved prompt ids."""
    import torch
    manifest = json.loads((art / "manifest.json").read_text())
    inputs = torch.load(base["inputs"])
    inputs_json = work / "inputs.json"
    inputs_json.write_text(json.dumps({"prompt_ids": list(map(int, inputs["prompt_ids"])),
                                       "num_tiles": list(map(int, inputs["num_tiles"]))}))
    # Our greedy tokens for the text-only prompt: what the llama.cpp rows' match_tokens compare with.
    text_json = work / "ours_text.json"
    (work / "ours_text.spec.json").write_text(json.dumps(base))
    if subprocess.run([sys.executable, "-m", "internvl_aot.bench.llamacpp", "--ours-text",
                       str(work / "ours_text.spec.json"), str(text_json)]).returncode != 0:
        print("[bench] warning: our text-only run failed: llama.cpp rows get no match_tokens", file=sys.stderr)
    rows = []
    for qtype in types:
        engine = f"llama.cpp-{qtype}"
        path, info = gguf_file(art, manifest, qtype, gguf_dir)
        if path is None:
            rows.append({"engine": engine, "dtype": qtype, "error": info["error"]})
            continue
        spec = dict(base, engine=engine, gguf_type=qtype, gguf=str(path), inputs_json=str(inputs_json),
                    ours_text=str(text_json) if text_json.exists() else None)
        got = run_worker(spec, work, engine, module="internvl_aot.bench.llamacpp")
        if any("signal 4" in r.get("error", "") for r in got):
            # SIGILL: seen on an AMX box (a VM, 2026-12-01): llama.cpp's AMX q8_0 kernels die at their
            # first tileloadd. Run again without llama.cpp's extra weight layouts (AMX and REPACK).
            print(f"[bench] {engine} died of SIGILL (llama.cpp's AMX kernels?): again with use_extra_bufts=False",
                  file=sys.stderr)
            got = run_worker(dict(spec, extra_bufts=False), work, engine + "-noextra",
                             module="internvl_aot.bench.llamacpp")
        for r in got:
            r.update(dtype=qtype, gguf_export_s=info.get("seconds"))
        rows += got
    return rows


def _ratio(a, b, digits=3):
    return round(a / b, digits) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def artifact_gemm_ops(art: Path, manifest: dict) -> dict:
    """{"linear_fp32": the op} where the artifact's graphs call the kernel library's fp32 GEMM (compile/passes/
    fp32_gemm.py, int8_weights.py, int4_weights.py report it per graph), its library loaded in this process; else
    {}. The bench's GEMM rate then includes the GEMM the first token actually runs (kernels/fp32_gemm.cpp beats
    torch's fp32 GEMM on AVX2: the fraction would read above 1 against torch's alone)."""
    reports = manifest.get("compile", {}).get("passes", {})
    calls = any(r.get("passes", {}).get(p, {}).get(key, 0)
                for r in reports.values() if isinstance(r, dict)
                for p, key in (("fp32_gemm", "kernel"), ("int8_weights", "gemm_kernel"), ("int4_weights", "gemm_kernel")))
    if not calls:
        return {}
    import torch
    from ..kernels import load_for_artifact
    load_for_artifact(art, manifest)
    return {"linear_fp32": lambda x, w: torch.ops.internvl.linear_fp32(x, w)}


def finish_rows(rows: list[dict], manifest: dict, copy_gbs: float, gemm_gflops: float | None = None) -> list[dict]:
    """Add the roofline, memory and ratio columns. gemm_gflops: the box's best measured GEMM rate (any
    dtype: an engine may compute bf16 weights in fp32), for the time-to-first-token compute bound."""
    from ..compile.checkpoint import canonical_shapes
    from ..graphs.config import ModelConfig
    from .measure import common_prefix, decode_read_bytes, prefill_flops, roofline, sig
    import math

    cfg = ModelConfig.from_dict(manifest["model"]["config"])
    shapes = canonical_shapes(cfg)
    llm_params = sum(math.prod(s) for k, s in shapes.items() if k.startswith("language_model."))
    embed = math.prod(shapes["language_model.embed_tokens.weight"])
    llm = manifest["model"]["config"]["llm"]
    ours = {r["batch_size"]: r for r in rows if r.get("engine") == "ours" and "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        if r["engine"].startswith("llama.cpp"):
            # GGUF weights (bytes per weight of their type) + its f16 K/V cache
            kv = decode_read_bytes(llm, embed, embed, "fp16", r["batch_size"], r["input_tokens"],
                                   r["output_tokens"]) - r["batch_size"] * llm["hidden_size"] * 2
            rb = int((llm_params - embed + r["batch_size"] * llm["hidden_size"]) * GGUF_BYTES[r["dtype"]] + kv)
        else:
            rb = decode_read_bytes(llm, llm_params, embed, r["dtype"], r["batch_size"], r["input_tokens"],
                                   r["output_tokens"], r.get("quant", "none"))
        r.update(roofline(rb, copy_gbs, r["decode_ms_mean"]), copy_gbs=copy_gbs)
        # The last first token of the batch came after every request's vision and prefill (llama.cpp: text only).
        tiles = 0 if r["engine"].startswith("llama.cpp") else r.get("num_tiles", 0)
        flop = r["batch_size"] * prefill_flops(cfg, tiles, r["input_tokens"])
        r["ttft_tflop"] = sig(flop / 1e12)
        if gemm_gflops and r.get("ttft_max_s"):
            r.update(gemm_gflops=gemm_gflops, ttft_compute_frac=sig(flop / (gemm_gflops * 1e9) / r["ttft_max_s"], 3))
        r["rss_over_weights_kv"] = _ratio(r["peak_rss_mb"], r["weights_mb"] + r["kv_mb"])
        o = ours.get(r["batch_size"])
        if r["engine"] != "ours" and o is not None:
            # llama.cpp rows: agreement on the text-only prompt (the image positions differ: bench/llamacpp.py)
            r["match_tokens"] = (r.get("match_tokens_text") if r["engine"].startswith("llama.cpp")
                                 else common_prefix(o["output_ids"], r["output_ids"]))
            r["ratio_ttft"] = _ratio(o["ttft_s"], r["ttft_s"])
            # the LLM's prompt rate on the same prompt ids (ours: vision steps excluded; transformers: not split)
            r["ratio_prefill_tok_s"] = _ratio(o.get("prefill_tok_s"), r.get("prefill_tok_s"))
            r["ratio_decode_tok_s"] = _ratio(o["decode_tok_s"], r["decode_tok_s"])
            r["ratio_e2e_tok_s"] = _ratio(o["e2e_tok_s"], r["e2e_tok_s"])
            r["ratio_peak_rss"] = _ratio(o["peak_rss_mb"], r["peak_rss_mb"])
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def format_table(rows: list[dict]) -> str:
    head = (f"{'batch':>5} {'engine':<26} {'in':>5} {'out':>4} {'ttft s':>8} {'ms/tok':>8} {'p99 ms':>8} "
            f"{'tok/s':>8} {'e2e tok/s':>9} {'RSS MB':>8} {'roofline':>8} {'ttft cmp':>8} | {'ttft':>6} {'prompt':>6} "
            f"{'decode':>6} {'RSS':>5}")
    lines = [head, "-" * len(head)]

    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    for r in sorted((r for r in rows if "error" not in r), key=lambda r: (r["batch_size"], r["engine"] != "ours")):
        name = r["engine"] + " " + _dtype_label(r)
        ratios = "" if r["engine"] == "ours" else (
            f" | {f(r.get('ratio_ttft'), '6.2f')} {f(r.get('ratio_prefill_tok_s'), '6.2f')} "
            f"{f(r.get('ratio_decode_tok_s'), '6.2f')} "
            f"{f(r.get('ratio_peak_rss'), '5.2f')}")
        lines.append(f"{r['batch_size']:>5} {name:<26} {r['input_tokens']:>5} {r['output_tokens']:>4} "
                     f"{f(r['ttft_s'], '8.3f')} {f(r['decode_ms_mean'], '8.1f')} {f(r['decode_ms_p99'], '8.1f')} "
                     f"{f(r['decode_tok_s'], '8.2f')} {f(r['e2e_tok_s'], '9.2f')} {f(r['peak_rss_mb'], '8.0f')} "
                     f"{f(r.get('roofline_frac'), '8.2f')} {f(r.get('ttft_compute_frac'), '8.2f')}{ratios}")
    for r in rows:
        if "error" in r:
            lines.append(f"  {r.get('engine')} {r.get('dtype')}: ERROR {r['error']}")
    lines.append("ratios are ours / theirs at the same batch size (ttft: lower is better; prompt = prefill tok/s of "
                 "the LLM, vision excluded, and decode tok/s: higher; "
                 "RSS: lower); roofline = fraction of the copy-bandwidth bound; ttft cmp = fraction of the GEMM-rate bound "
                 "of the first tokens (vision + prefill FLOPs / the box's best matmul rate)")
    return "\n".join(lines)


def markdown_table(meta: dict) -> str:
    """The rows as a docs/performance.md table, with the command, date and conditions under it."""
    def f(v, spec=""):
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    lines = ["| batch | engine | in / out tokens | TTFT s | decode ms/token (mean / p99) | decode tok/s | e2e tok/s "
             "| peak RSS MB (x weights+KV) | roofline frac | TTFT compute frac | ours/theirs: TTFT, prefill tok/s, decode tok/s, "
             "RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in meta["rows"] if "error" not in r),
                    key=lambda r: (r["batch_size"], r["engine"] != "ours", r["engine"], r["dtype"])):
        ratios = "" if r["engine"] == "ours" else (
            f"{f(r.get('ratio_ttft'), '.2f')}, {f(r.get('ratio_prefill_tok_s'), '.2f')}, "
            f"{f(r.get('ratio_decode_tok_s'), '.2f')}, {f(r.get('ratio_peak_rss'), '.2f')}")
        lines.append(f"| {r['batch_size']} | {r['engine']} {_dtype_label(r)} | {r['input_tokens']} / {r['output_tokens']} "
                     f"| {f(r['ttft_s'], '.2f')} | {f(r['decode_ms_mean'], '.0f')} / {f(r['decode_ms_p99'], '.0f')} "
                     f"| {f(r['decode_tok_s'], '.2f')} | {f(r['e2e_tok_s'], '.2f')} "
                     f"| {f(r['peak_rss_mb'], '.0f')} ({f(r.get('rss_over_weights_kv'), '.2f')}) "
                     f"| {f(r.get('roofline_frac'), '.3f')} | {f(r.get('ttft_compute_frac'), '.3f')} | {ratios} |")
    for r in meta["rows"]:
        if "error" in r:
            lines.append(f"| - | {r.get('engine')} {r.get('dtype')} | error: {r['error']} | | | | | | | |")
    bw, load = meta["bandwidth"], meta.get("loadavg", {})
    lines.append(f"\n`{meta['command']}` ({meta['date']}; copy bandwidth {bw['copy_gbs']} GB/s"
                 + (f", read {bw['read_gbs']} GB/s" if "read_gbs" in bw else "")
                 + (f"; load average {load.get('start')} -> {load.get('end')}" if load else "") + ")")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    art = Path(args.artifact)
    try:
        manifest = json.loads((art / "manifest.json").read_text())
        batch_sizes = parse_batch_sizes(args.batch_sizes)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    compare = [c.strip() for c in args.compare.split(",") if c.strip() and c.strip() != "none"]
    bad = [c for c in compare if c not in ENGINES]
    if bad:
        print(f"error: unknown --compare engine(s) {bad}; known: {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    max_batch = max(manifest["buckets"]["batch"])
    if batch_sizes[-1] > max_batch:
        print(f"[bench] warning: batch sizes above {max_batch}, the artifact's largest batch bucket, run as "
              f"{max_batch} at a time (the rest queue)", file=sys.stderr)
    hf_dtypes = [d.strip() for d in (args.hf_dtype or manifest["dtype"]).split(",") if d.strip()]
    gguf_types = [t.strip() for t in args.llamacpp_types.split(",") if t.strip()]
    if "llama.cpp" in compare:
        why = llamacpp_missing(gguf_types)
        if why:
            print(f"error: --compare llama.cpp: {why}", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from .measure import measure_bandwidth, measure_gemm_flops, measure_gpu_bandwidth
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = os.getloadavg()
    if manifest["backend"] == "cuda" or (compare and (args.device or "").startswith("cuda")):
        bw = measure_gpu_bandwidth()
    else:
        bw = measure_bandwidth()
    print(f"[bench] copy bandwidth {bw['copy_gbs']} GB/s (2 x bytes / s)"
          + (f", read {bw['read_gbs']} GB/s" if "read_gbs" in bw else ""), file=sys.stderr, flush=True)
    gemm = None if "device" in bw else measure_gemm_flops(ops=artifact_gemm_ops(art, manifest))
    if gemm:
        slow = [k for k, r in gemm.get("gemm_rows", {}).items() if r != gemm["gemm_shape"][0]]
        print(f"[bench] GEMM {gemm['gemm_shape']}: " + ", ".join(f"{k} {v} GFLOP/s" for k, v in gemm["gemm_gflops"].items())
              + (f" ({', '.join(slow)}: no fast GEMM here, an 8-row probe's rate)" if slow else ""),
              file=sys.stderr, flush=True)

    from .background import background_load, omp_env
    omp_env(args.omp_wait)
    with tempfile.TemporaryDirectory(prefix="internvl-bench-") as tmp, \
            background_load(args.background_load, args.background_nice) as neighbours:
        work = Path(tmp)
        image = Path(args.image) if args.image else synthetic_image(work / "image.png")
        base = {"artifact": str(art.resolve()), "batch_sizes": batch_sizes, "output_tokens": args.output_tokens,
                "image": str(image), "max_tiles": args.max_tiles, "prompt": args.prompt, "threads": args.threads,
                "inputs": str(work / "inputs.pt"), "kv_cache_gb": args.kv_cache_gb, "skip_verify": args.skip_verify,
                "device": args.device}
        rows = run_worker(dict(base, engine="ours", dtype=manifest["dtype"]), work, "ours")
        if any("error" in r for r in rows) and not (work / "inputs.pt").exists():
            compare = []
        for engine in compare:
            if engine == "llama.cpp":
                rows += run_llamacpp(base, art, work, gguf_types, Path(args.gguf_dir) if args.gguf_dir else work)
                continue
            for dt in hf_dtypes:
                rows += run_worker(dict(base, engine=engine, hf_dtype=dt), work, f"{engine}-{dt}")

    # Other processes can steal bandwidth at any moment: measure again at the end and take the
    # better figure as the machine's (both are recorded).
    bw_end = measure_gpu_bandwidth() if "device" in bw else measure_bandwidth()
    bw = dict(bw, copy_gbs_start=bw["copy_gbs"], copy_gbs_end=bw_end["copy_gbs"],
              copy_gbs=max(bw["copy_gbs"], bw_end["copy_gbs"]))
    if "read_gbs" in bw:
        bw.update(read_gbs_start=bw["read_gbs"], read_gbs_end=bw_end["read_gbs"],
                  read_gbs=max(bw["read_gbs"], bw_end["read_gbs"]))
    print(f"[bench] copy bandwidth at the end {bw_end['copy_gbs']} GB/s; roofline uses {bw['copy_gbs']} GB/s",
          file=sys.stderr)
    rows = finish_rows(rows, manifest, bw["copy_gbs"], max(gemm["gemm_gflops"].values()) if gemm else None)
    write_csv(rows, out / "benchmark.csv")
    meta = {"command": "internvl-bench " + " ".join(sys.argv[1:] if argv is None else argv), "date": started,
            "machine": machine_info(), "bandwidth": bw, "gemm": gemm,
            # Other processes on the box: 1-minute load average before and after the run.
            "loadavg": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
            "artifact": {"path": str(art), "model": manifest["model"]["name"], "dtype": manifest["dtype"],
                         "buckets": manifest["buckets"], "source": manifest.get("source"),
                         "device": manifest.get("device")},
            "settings": {k: base[k] for k in ("batch_sizes", "output_tokens", "max_tiles", "prompt", "threads")},
            "background_load": {k: v for k, v in neighbours.items() if k != "pids"},
            "omp_wait": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
            "lowering": manifest.get("compile", {}).get("lowering"),
            "rows": rows}
    lc = next((r for r in rows if r.get("engine", "").startswith("llama.cpp") and "system_info" in r), None)
    if lc:
        meta["llama_cpp"] = {k: lc.get(k) for k in ("llama_cpp_python", "system_info", "flash_attn_type")}
    (out / "benchmark.json").write_text(json.dumps(meta, indent=1))
    (out / "benchmark.md").write_text(markdown_table(meta))
    print(format_table(rows))
    print(f"[bench] wrote {out / 'benchmark.csv'}, benchmark.json and benchmark.md", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
