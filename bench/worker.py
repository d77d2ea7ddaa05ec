"""One engine's sweep in its own process (so its peak memory is its own):

    python -m internvl_aot.bench.worker SPEC.json ROWS.jsonl

Each finished row is appended to ROWS.jsonl at once, so a run cut short keeps its rows.
"""
from __future__ import annotations

import json
import sys
import traceback


def run_recorded(rows_path: str, label: str, body, detail=lambda row: "") -> int:
    """body(emit): each row emit()ted is appended to rows_path at once and reported on stderr; an
    exception becomes an {"error": ...} row (the CSV says where an engine did not work) and exit 1.
    Shared by this worker and the llama.cpp one (bench/llamacpp.py); imports no torch."""
    def emit(row: dict) -> None:
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[bench] {label} batch {row['batch_size']}: ttft {row['ttft_s']} s{detail(row)}, decode "
              f"{row['decode_ms_mean']} ms/step, {row['decode_tok_s']} tok/s, peak RSS {row['peak_rss_mb']} MB",
              file=sys.stderr, flush=True)

    try:
        body(emit)
    except Exception as e:  # recorded in the CSV: "where it works"
        traceback.print_exc()
        with open(rows_path, "a") as f:
            f.write(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
                    + "\n")
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, rows_path = argv
    spec = json.loads(open(spec_path).read())
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    label = f"{spec['engine']}" + (f" {spec['hf_dtype']}" if spec.get("hf_dtype") else "")

    def body(emit) -> None:
        if spec["engine"] == "ours":
            from . import ours
            ours.run(spec, emit)
        else:
            from . import hf
            hf.run(spec, emit)

    detail = (lambda row: f" (vision {row['vision_s']} s, prefill {row['prefill_tok_s']} prompt tok/s)") \
        if spec["engine"] == "ours" else (lambda row: "")
    return run_recorded(rows_path, label, body, detail)


if __name__ == "__main__":
    sys.exit(main())
