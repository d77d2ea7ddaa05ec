"""ONNX artifact beside an AOTInductor one (docs/performance.md, "ONNX"): one artifact per process, so
peak RSS is the engine's own. Measures load, TTFT (one image tile + a question), decode tok/s at each
batch size (text prompts, EOS ignored), peak RSS. Prints one JSON line.

    .venv/bin/python tools/onnx_bench.py --artifact DIR [--threads 1] [--batch-sizes 1,4,8] [--tokens 16]
"""
import argparse
import json
import os
import resource
import sys
import time


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--image", default=os.path.join(os.path.dirname(__file__), "..", "models", "internvl-demo", "demo.png"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    from internvl_aot.runtime.engine import Engine, Request
    from internvl_aot.runtime.sampler import SamplingParams
    t0 = time.perf_counter()
    eng = Engine.from_artifact(args.artifact, threads=args.threads, skip_verify=True)
    out = {"artifact": args.artifact, "engine": type(eng).__name__, "threads": args.threads,
           "load_s": round(time.perf_counter() - t0, 2), "rss_after_load_mb": round(rss_mb())}
    batches = [int(b) for b in args.batch_sizes.split(",")]
    policy = eng.runner.policy
    p1 = SamplingParams(max_new_tokens=1, ignore_eos=True)
    r = eng.generate([Request(prompt="Describe the picture in detail, please.", images=[args.image], max_tiles=1,
                              params=p1)])[0]
    out["ttft_1tile_s"] = r.timings["ttft_s"]
    out["ttft_prompt_tokens"] = len(r.prompt_token_ids)
    for b in batches:
        if b > policy.max_batch:
            out[f"decode_b{b}_tok_s"] = None
            continue
        reqs = [Request(prompt=f"Tell me story number {i} about a fox.",
                        params=SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)) for i in range(b)]
        seqs = [eng.make_sequence(q) for q in reqs]
        for s in seqs:
            eng.scheduler.add(s)
        steps = []
        eng.run_until_done(seqs, on_step=steps.append)
        dec = [s for s in steps if s.kind == "decode" and len(s.seq_ids) == b]
        out[f"decode_b{b}_tok_s"] = round(sum(s.new_tokens for s in dec) / sum(s.seconds for s in dec), 3)
        out[f"decode_b{b}_step_ms"] = round(1000 * sum(s.seconds for s in dec) / len(dec), 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["loadavg"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
