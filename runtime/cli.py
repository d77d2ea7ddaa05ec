"""internvl-run: answer a question about images (or plain text) with a compiled artifact.

    internvl-run --artifact artifacts/internvl2-2b-tp1-cpu-bf16 --image cat.jpg --prompt "What is this?"
    internvl-run --artifact model.ivl --trusted-keys /etc/internvl/trusted --prompt "Hello"    # a signed bundle
    internvl-run --artifact model.ivl --check     # can this box run it? (loads none of its native code)

Text streams to stdout as tokens arrive; --json adds one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="internvl-run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True,
                    help="artifact directory (from `make compile`) or bundle (from `internvl-artifact pack`)")
    ap.add_argument("--check", action="store_true",
                    help="only say whether this box can run the artifact and every reason it cannot (exit 0 or 1)")
    ap.add_argument("--trusted-keys", default=None, metavar="DIR",
                    help="trust store: refuse artifacts not signed by one of the *.pub keys in DIR "
                         "(default: $INTERNVL_TRUSTED_KEYS; none: run unverified, with a note)")
    ap.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    ap.add_argument("--prompt", default=None, help="the question (default: describe the image)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-tiles", type=int, default=None, help="tiles per image (default: the checkpoint's)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--system", default=None, help="system message (default: the template's)")
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="also stop at the tokenizer's EOS (the original chat() stops only at the template's separator)")
    ap.add_argument("--json", action="store_true", help="print a JSON result object as the last line")
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache budget (default: sized to the buckets)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: the artifact's backend)")
    ap.add_argument("--skip-verify", action="store_true", help="skip the sha256 check of the artifact's files")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trusted_keys:
        os.environ["INTERNVL_TRUSTED_KEYS"] = args.trusted_keys      # tensor-parallel ranks inherit it
    if args.check:
        from .check import report
        return report(args.artifact, check_hashes=not args.skip_verify)
    import warnings
    try:
        import torch
    except ImportError:         # only the ONNX runtime installed: a BACKEND=onnx artifact runs on numpy
        torch = None
    from .check import UnverifiedArtifact
    from .engine import Engine
    from .manifest import ArtifactError
    from .sampler import SamplingParams
    if torch is not None:
        from .tp import TPError
    else:
        class TPError(RuntimeError):
            pass

    if args.threads and torch is not None:
        torch.set_num_threads(args.threads)
    prompt = args.prompt if args.prompt is not None else (
        "Please describe the image shortly." if args.image else None)
    if prompt is None:
        print("error: give --prompt (and --image for a question about a picture)", file=sys.stderr)
        return 2
    for path in args.image:
        if not os.path.isfile(path):
            print(f"error: image {path} not found", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, stop_at_eos=args.stop_at_eos)
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", UnverifiedArtifact)
            engine = Engine.from_artifact(args.artifact, device=args.device, kv_cache_gb=args.kv_cache_gb,
                                          skip_verify=args.skip_verify, threads=args.threads)
        unverified = [str(n.message) for n in notes if issubclass(n.category, UnverifiedArtifact)]
        for n in notes:
            if not issubclass(n.category, UnverifiedArtifact):
                warnings.showwarning(n.message, n.category, n.filename, n.lineno)
    except (ArtifactError, ValueError, OSError, TPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    try:
        return _run(args, engine, prompt, params, time.perf_counter() - t0)
    except TPError as e:       # a tensor-parallel rank died: the group is down already
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        engine.close()          # stops the other tensor-parallel ranks, if any
        for note in unverified:     # said once, last, so that an error stays the first line of stderr
            print(note, file=sys.stderr)


def _run(args, engine, prompt, params, load_s: float) -> int:
    from .engine import Request, RequestError

    stream = engine.tokenizer.stream(skip_special_tokens=True)
    def on_token(seq, tok):
        if engine.is_stop_token(seq, tok):
            return
        delta = stream.feed(tok)
        if delta:
            sys.stdout.write(delta)
            sys.stdout.flush()

    req = Request(prompt=prompt, images=args.image, system=args.system, max_tiles=args.max_tiles, params=params)
    try:
        result = engine.generate([req], on_token=on_token)[0]
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    sys.stdout.write(stream.finish() + "\n")
    t = result.timings
    print(f"[{len(result.prompt_token_ids)} prompt tokens, tiles {result.num_tiles}, {len(result.output_token_ids)} "
          f"new tokens ({result.finish_reason}); load {load_s:.2f} s, first token {t['ttft_s']:.2f} s, "
          f"decode {t['decode_tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    if args.json:
        result.timings["load_s"] = round(load_s, 3)
        print(json.dumps({"text": result.text, "prompt_token_ids": result.prompt_token_ids,
                          "output_token_ids": result.output_token_ids, "num_tiles": result.num_tiles,
                          "finish_reason": result.finish_reason, "timings": result.timings},
                         ensure_ascii=False))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
