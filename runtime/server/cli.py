"""internvl-serve: serve a compiled artifact over HTTP (MindIE native, TGI, Triton, vLLM, OpenAI).

    internvl-serve --artifact artifacts/internvl-demo-tp1-cpu-fp32 --host 127.0.0.1 --port 8000
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="internvl-serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="artifact directory (from `make compile`)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None, help="model name in replies (default: the artifact's)")
    ap.add_argument("--max-new-tokens-cap", type=int, default=None,
                    help="largest max_new_tokens a request may ask for (default: the largest context bucket)")
    ap.add_argument("--max-body-mb", type=float, default=40.0, help="largest request body (MindIE's default: 40)")
    ap.add_argument("--max-images", type=int, default=20, help="images per request")
    ap.add_argument("--max-image-mb", type=float, default=20.0, help="bytes per image")
    ap.add_argument("--max-image-pixels", type=int, default=40_000_000,
                    help="pixels per image, checked from the header before decoding")
    ap.add_argument("--allowed-local-media-path", default=None, help="folder requests may read images from")
    ap.add_argument("--allowed-media-domains", default="",
                    help="comma-separated hostnames that http(s) image URLs may name (default: none)")
    ap.add_argument("--vllm-stream-delimiter", choices=("nul", "newline"), default="nul",
                    help="record delimiter of the vLLM /generate stream: nul (MindIE, vLLM before 2024-11) or "
                         "newline (current vLLM)")
    ap.add_argument("--prefill-chunks-per-decode", type=int, default=1,
                    help="vision/prefill chunks run between two decode steps while sequences decode")
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (per rank for TP artifacts)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip-verify", action="store_true", help="skip the sha256 check of the artifact's files")
    ap.add_argument("--log-level", default="info")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("error: internvl-serve needs the serve extra: pip install 'internvl-aot[serve]'", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:         # only the ONNX runtime installed: a BACKEND=onnx artifact runs on numpy
        torch = None

    from ..engine import Engine
    from ..manifest import ArtifactError
    if torch is not None:
        from ..tp import TPError
    else:
        class TPError(Exception):          # never raised without torch
            pass
    from .app import ServerOptions, create_app
    from .media import MediaPolicy

    if args.threads and torch is not None:
        torch.set_num_threads(args.threads)
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        print(f"error: --allowed-local-media-path {args.allowed_local_media_path} is not a folder", file=sys.stderr)
        return 2
    try:
        engine = Engine.from_artifact(args.artifact, device=args.device, kv_cache_gb=args.kv_cache_gb,
                                      skip_verify=args.skip_verify, threads=args.threads,
                                      prefill_chunks_per_decode=args.prefill_chunks_per_decode)
    except (ArtifactError, ValueError, OSError, TPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    media = MediaPolicy(allowed_local_path=args.allowed_local_media_path,
                        allowed_domains=[d.strip() for d in args.allowed_media_domains.split(",") if d.strip()],
                        max_images=args.max_images, max_image_bytes=int(args.max_image_mb * (1 << 20)),
                        max_pixels=args.max_image_pixels)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.artifact))
    options = ServerOptions(model_name=name, max_new_tokens_cap=args.max_new_tokens_cap, max_body_mb=args.max_body_mb,
                            vllm_delimiter="\0" if args.vllm_stream_delimiter == "nul" else "\n", media=media)
    try:
        uvicorn.run(create_app(engine, options), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
