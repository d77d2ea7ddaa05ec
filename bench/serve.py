"""The server under load: N streaming clients for a fixed time, and the stall a big prompt causes.

    python -m internvl_aot.bench.serve --artifact DIR [--clients 8] [--duration 60] [--max-new-tokens 32]

Starts `internvl-serve` on loopback (its own process), waits for /health, then runs `--clients`
closed-loop clients, each sending an OpenAI chat request (one image, streamed, greedy, EOS
ignored) as soon as its previous one ends. Halfway through, one extra request with a 7-tile
image arrives (`--stall-tiles`); the decode stall it causes is the longest gap between two
tokens of the other streams while it is being prefilled, against their median gap outside that
window. Prints one JSON object: requests/s, output tokens/s, TTFT p50/p99, inter-token p50/p99,
the stall, and the server's RSS before and after (from /proc).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time

from .measure import percentile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(artifact, *args: str, log=None, timeout_s: float = 120.0):
    """`internvl-serve` on loopback (a child process): yields (process, base URL) once /health
    answers 200, and terminates it on exit. Used by this benchmark and by the tests."""
    import httpx
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "internvl_aot.runtime.server.cli", "--artifact", str(artifact),
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args],
                            stdout=log or subprocess.DEVNULL, stderr=log or subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: "
                                   f"{proc.stderr.read()[-2000:] if proc.stderr else ''}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout_s} s")
            time.sleep(0.3)
        yield proc, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _png(w: int, h: int, seed: int) -> str:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def stream_chat(base: str, image_b64: str, question: str, max_tokens: int, max_tiles: int | None = None) -> dict:
    """One streamed chat request -> {t_send, ttft, token times}."""
    import httpx
    body = {"model": "bench", "temperature": 0, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}}]}]}
    t0 = time.perf_counter()
    times = []
    with httpx.Client(timeout=600) as c, c.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
    return {"t_send": t0, "times": times, "ttft": (times[0] - t0) if times else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m internvl_aot.bench.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--stall-tiles", type=int, default=7, help="tiles of the late big request (0: none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--server-args", default="", help="extra internvl-serve arguments")
    args = ap.parse_args(argv)

    extra = (["--threads", str(args.threads)] if args.threads else []) + args.server_args.split()
    t_start = time.time()
    with running_server(args.artifact, *extra, log=sys.stderr) as (proc, base):
        load_s = time.time() - t_start
        rss_before = _rss_mb(proc.pid)
        img = _png(448, 448, 0)
        # one warm-up request
        stream_chat(base, img, "Describe the picture.", 4)
        results, lock, stop_at = [], threading.Lock(), time.perf_counter() + args.duration

        def client(i):
            while time.perf_counter() < stop_at:
                r = stream_chat(base, img, f"Describe the picture, please ({i}).", args.max_new_tokens)
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        big = None
        if args.stall_tiles:
            time.sleep(args.duration / 2)
            # 7 tiles = a 3x2 grid + thumbnail: a 1344x896 picture with max_tiles 6
            big = stream_chat(base, _png(1344, 896, 1), "What is in this picture?", 4)
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_after = _rss_mb(proc.pid)
        done = [r for r in results if r["times"]]
        gaps = [b - a for r in done for a, b in zip(r["times"], r["times"][1:])]
        out = {"clients": args.clients, "duration_s": round(wall, 1), "requests": len(done),
               "requests_per_s": round(len(done) / wall, 3),
               "output_tokens_per_s": round(sum(len(r["times"]) for r in done) / wall, 2),
               "ttft_p50_s": round(percentile([r["ttft"] for r in done], 50), 4),
               "ttft_p99_s": round(percentile([r["ttft"] for r in done], 99), 4),
               "itl_p50_ms": round(1000 * percentile(gaps, 50), 2), "itl_p99_ms": round(1000 * percentile(gaps, 99), 2),
               "server_load_s": round(load_s, 1), "rss_before_mb": round(rss_before, 1),
               "rss_after_mb": round(rss_after, 1)}
        if big and big["times"]:
            lo, hi = big["t_send"], big["times"][0]
            inside = [b - a for r in done for a, b in zip(r["times"], r["times"][1:]) if b > lo and a < hi]
            outside = [b - a for r in done for a, b in zip(r["times"], r["times"][1:]) if b <= lo or a >= hi]
            out.update({"big_request_tiles": args.stall_tiles, "big_ttft_s": round(hi - lo, 3),
                        "stall_max_gap_ms": round(1000 * max(inside), 1) if inside else None,
                        "median_gap_outside_ms": round(1000 * percentile(outside, 50), 2) if outside else None})
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
