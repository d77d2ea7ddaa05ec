"""internvl-compile: a checkpoint (or a registry model with random weights) -> an artifact.

    internvl-compile --model internvl2-2b --weights /ckpt/InternVL2-2B --dtype bf16 --out artifacts/x
    internvl-compile --model /ckpt/InternVL2-2B
    internvl-compile --model internvl2-2b --weights random
    internvl-compile --model internvl-demo --dtype fp32 --target x86-64-v3    # for AVX2 boxes, built anywhere
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..runtime.isa import TARGET_NAMES
from .buckets import Buckets


def default_backend() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


REPO_ROOT = Path(__file__).resolve().parents[1]     # the checkout, when installed with `pip install -e`


def find_checkpoint(name: str) -> Path:
    """$INTERNVL_WEIGHTS/<name>, then a checkpoint that ships in the repository (the demo model),
    then the Hugging Face cache (offline); a clear error listing where it looked."""
    from .registry import registry_entry
    looked = []
    root = os.environ.get("INTERNVL_WEIGHTS")
    if root:
        cand = Path(root) / name
        looked.append(str(cand))
        if (cand / "config.json").is_file():
            return cand
    else:
        looked.append("$INTERNVL_WEIGHTS/<name> ($INTERNVL_WEIGHTS is not set)")
    try:
        local = registry_entry(name).local_dir
    except KeyError:
        local = None
    if local:
        for base in (REPO_ROOT, Path.cwd()):
            cand = base / local
            looked.append(str(cand))
            if (cand / "config.json").is_file():
                return cand
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    try:
        repo = registry_entry(name).hf_repo
    except KeyError:
        repo = None
    if repo:
        snaps = hub / f"models--{repo.replace('/', '--')}" / "snapshots"
        looked.append(str(snaps / "*"))
        for snap in sorted(snaps.glob("*")) if snaps.is_dir() else []:
            if (snap / "config.json").is_file():
                return snap
    raise FileNotFoundError(f"no checkpoint for {name!r}; looked in: {'; '.join(looked)}. "
                            f"Pass WEIGHTS=<checkpoint dir>, or WEIGHTS=random for a random-weight build")


def resolve(model: str, weights: str | None, dtype: str, work: Path):
    """-> (config, canonical weights, tokenizer dir, source description)."""
    from .checkpoint import checkpoint_fingerprint, load_checkpoint, random_weights
    from .registry import registry_config
    from .spec import DTYPE_NAMES
    from ..runtime.manifest import DTYPES
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"DTYPE must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if weights == "random":
        if Path(model).is_dir():
            from .checkpoint import load_config
            cfg = load_config(model)
        else:
            cfg = registry_config(model)
        from .synthetic_tokenizer import write_synthetic_tokenizer
        tok_dir = write_synthetic_tokenizer(cfg, work / "tokenizer")
        return cfg, random_weights(cfg, DTYPES[dtype]), tok_dir, {"weights": "random", "model": model}
    path = Path(weights) if weights else (Path(model) if Path(model).is_dir() else find_checkpoint(model))
    cfg, state = load_checkpoint(path, dtype=DTYPES[dtype])
    if not Path(model).is_dir():
        cfg.name = model
    return cfg, state, path, {"path": str(path.resolve()), "fingerprint": checkpoint_fingerprint(path)}


def check_tp_early(model: str, weights: str | None, tp: int) -> None:
    """Refuse a TP size that does not fit the model before any weight is read (the message lists
    the TP values that do); the compile pipeline checks again with the final config."""
    from .checkpoint import load_config
    from .registry import is_registry_name, registry_config
    from .tp import check_tp
    if weights and weights != "random" and Path(weights).is_dir():
        cfg = load_config(weights)
    elif Path(model).is_dir():
        cfg = load_config(model)
    elif is_registry_name(model):
        cfg = registry_config(model)
    else:
        return                      # resolve() says what is wrong with the name
    check_tp(cfg, tp)


# --kernels as compile_model's attention_kernel (decode attention through kernels/paged_attention.cpp)
ATTENTION_KERNEL = {"auto": None, "on": True, "off": False}


def kernel_options(choice: str) -> dict | None:
    """--kernels as pass options: the `kernel` option of every pass that lowers linears to kernels/' ops."""
    if choice == "auto":
        return None
    on = choice == "on"
    return {"small_m_linear": {"kernel": on}, "int8_weights": {"kernel": on}, "int4_weights": {"kernel": on},
            "fp32_gemm": {"kernel": on}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="internvl-compile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="registry name (e.g. internvl2-2b) or a checkpoint directory")
    ap.add_argument("--weights", default=None, help="checkpoint directory, or 'random' for random weights")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--backend", default=None, choices=["cpu", "cuda", "npu", "onnx"],
                    help="npu: Ascend, through torch_npu/torchair + atc (compile/backends/npu.py); needs them installed; "
                         "onnx: ONNX graphs for onnxruntime / Ascend ATC (compile/backends/onnx.py)")
    ap.add_argument("--opset", type=int, default=18, help="BACKEND=onnx: the ONNX opset (18, or 15 for Ascend ATC)")
    ap.add_argument("--soc", default=None, help="BACKEND=npu: the Ascend SoC for atc --soc_version "
                                                "(e.g. Ascend910B3, Ascend910_9392: Atlas A2/A3); default $NPU_SOC")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", default=None,
                    help="default: artifacts/<model>-tp<n>-<backend>-<dtype>[-<quant>][-<target>]")
    ap.add_argument("--buckets", default=None,
                    help="e.g. 'vision=1,4;prefill=64,512;batch=1,2,4,8;context=1024,4096;block_size=32'")
    ap.add_argument("--target", default="native", choices=TARGET_NAMES,
                    help="CPU the artifact is for: native (this box, -march=native) or an x86-64 level "
                         "(x86-64-v3: AVX2+FMA+F16C; x86-64-v4: AVX-512; x86-64-v4-bf16: + AVX512-BF16)")
    ap.add_argument("--passes", default=None, help="comma-separated pass names (default: all); 'none' for none")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                    help="int8: the LLM's linear weights stored as int8 with per-output-channel scales "
                         "(weight-only; activations in DTYPE; compile/passes/int8_weights.py); int4: as 4-bit "
                         "integers with an fp32 scale per 128 weights of a row (compile/passes/int4_weights.py)")
    ap.add_argument("--kernels", default="auto", choices=["auto", "off", "on"],
                    help="the decode steps' hand-written kernels (kernels/: linears, attention): auto = where the target "
                         "has them (kernels.min_rows, kernels.attention_kernel), off = never (PyTorch's lowerings "
                         "only), on = from 1 row on any target")
    args = ap.parse_args(argv)
    backend = args.backend or default_backend()
    name = Path(args.model).name if Path(args.model).is_dir() else args.model
    suffix = (f"-{args.quant}" if args.quant != "none" else "") + (f"-{args.target}" if args.target != "native" else "")
    out = Path(args.out or f"artifacts/{name}-tp{args.tp}-{backend}-{args.dtype}{suffix}")
    passes = None if args.passes is None else ([] if args.passes == "none" else args.passes.split(","))
    try:
        if args.tp != 1:
            check_tp_early(args.model, args.weights, args.tp)
        buckets = Buckets.parse(args.buckets)
        if backend == "npu":
            if args.target != "native":
                raise ValueError(f"TARGET={args.target} is a CPU target; BACKEND=npu takes TARGET=native "
                                 f"(the NPU is chosen with SOC=...)")
            from .backends.npu import check_npu_request
            check_npu_request(name, args.dtype, args.soc, buckets)   # dtype, toolchain, block size, SoC: before any weight
        if backend == "onnx":
            from .backends.onnx import check_onnx_request
            check_onnx_request(args.dtype, args.tp, args.opset, args.target)
        work = out.parent / f".{out.name}.work"
        work.mkdir(parents=True, exist_ok=True)
        cfg, weights, tok_dir, source = resolve(args.model, args.weights, args.dtype, work)
        if backend == "npu":
            from .backends.npu import compile_npu
            compile_npu(cfg, weights, Path(tok_dir), out, buckets, dtype=args.dtype, tp=args.tp, soc=args.soc,
                        source=source)
            return 0
        from .pipeline import compile_model
        compile_model(cfg, weights, Path(tok_dir), out, buckets, dtype=args.dtype, backend=backend, tp=args.tp,
                      source=source, passes=passes, target=args.target, opset=args.opset,
                      quant=args.quant, pass_options=kernel_options(args.kernels),
                      attention_kernel=ATTENTION_KERNEL[args.kernels])
    except (FileNotFoundError, ValueError, NotImplementedError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import shutil
        shutil.rmtree(out.parent / f".{out.name}.work", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
