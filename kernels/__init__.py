"""Hand-written CPU kernels compiled into an artifact: `internvl::small_m_linear` and
`internvl::small_m_linear_int8` (small_m_gemm.cpp), `internvl::small_m_linear_int4` (int4_gemm.cpp; the block
loops both share: blocks.h), `internvl::paged_decode_attention` (paged_attention.cpp), and for targets without
native bf16 `internvl::linear_fp32`, `_int8` and `_int4` (fp32_gemm.cpp: the vision and prefill GEMMs in fp32
from bf16, int8 or int4 weights).

Why: a decode step multiplies every weight matrix by 1-8 token rows and is bound by reading the
weights. On an AVX512-BF16 CPU without AMX (AMD Zen 4) oneDNN's bf16 GEMM reads them at 14-17 GB/s at
M = 1-8 and Inductor's multiply+sum reduction (compile/passes/small_m_linear.py) at about 24 GB/s at
M = 1 only; this kernel streams each weight row once for all rows with vdpbf16ps, prefetching ahead
(docs/performance.md, fourth and fifth rounds). compile/passes/small_m_linear.py lowers a bf16 linear of
<= 8 rows to it where the compile target has it (`min_rows`: AVX512-BF16 from 1 row, AVX2 + FMA too);
compile/passes/int8_weights.py an int8 one (QUANT=int8) to the int8 op (from 1 row on both), int4_weights.py
an int4 one (QUANT=int4) to the int4 op (where the int8 op would be used). The decode
graphs' attention over the paged cache (graphs/attention.py, the same multiply + sum read the K/V at ~7 GB/s
inside Inductor) calls paged_decode_attention where `attention_kernel(target)`: the pipeline traces them
inside graphs.attention.decode_kernel (one key's row of all heads read once, scores and softmax as vector
loops, the next block prefetched).

How it ships: the library is built at compile time for the artifact's target (`-march` of the target, no
Python, linked against the torch it runs with) into the artifact as KERNELS_LIBRARY, hashed and signed
with every other file; the manifest's `compile.lowering.kernels` names it. The runtime loads it
(`load_for_artifact`) before any graph package is opened: AOTInductor calls the op through its proxy
executor, which needs the op registered in the process. Built libraries are cached by source, flags and
torch version under $INTERNVL_CACHE_DIR/kernels (one g++ run, about 30 s, per combination).

One copy of the op per process: a second artifact whose library has the same KERNELS_VERSION reuses the
first one's; a different version is refused (run that artifact in a process of its own).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCES = [Path(__file__).with_name(n)
           for n in ("small_m_gemm.cpp", "int4_gemm.cpp", "paged_attention.cpp", "fp32_gemm.cpp")]
HEADERS = [Path(__file__).with_name("blocks.h")]
KERNELS_LIBRARY = "kernels/internvl_kernels.so"   # inside an artifact directory
KERNELS_VERSION = 6                                 # = kVersion in small_m_gemm.cpp
OPS = ["internvl::small_m_linear", "internvl::small_m_linear_int8", "internvl::small_m_linear_int4",
       "internvl::dequant_int4", "internvl::paged_decode_attention", "internvl::linear_fp32",
       "internvl::linear_fp32_int8", "internvl::linear_fp32_int4"]
MAX_ROWS = 8

_loaded: dict = {}      # {"path": the library loaded in this process, "version": its KERNELS_VERSION}


class KernelError(RuntimeError):
    """The kernel library cannot be built or loaded; the message says what to do."""


def min_rows(target) -> int | None:
    """The fewest rows a linear calls the kernel at on `target` (compile/targets.py Target), or None.

    bf16 weights (internvl::small_m_linear): AVX512-BF16 without AMX from 1 row; AVX2 + FMA without AVX512-BF16
    (x86-64-v3) from 1 row too, where PyTorch's bf16 GEMM has no fast path (emulated on a Zen 4 with oneDNN
    limited to AVX2, 24 layers of 2B matrices, ms at M = 1 / 2 / 4 / 8: oneDNN 126 / 183 / 418 / 792; the kernel's
    AVX2 loop with the software prefetch of the fifth round 99-106 / 111-120 / 95-98 / 178-196. Whole 2B artifacts,
    batch-1 decode, emulated AVX2, four alternating pairs: the kernel 97-128 ms a step, Inductor's one-row
    reduction, which the kernel lost to before its prefetch, 125-156; docs/performance.md, eighth round).
    int8 and int4 weights (small_m_linear_int8 / _int4): from 1 row on both (int8: it beats every other int8
    lowering at every row count, docs/performance.md fifth round; int4's graph-op dequantisation is ~30x slower
    than the kernel's, seventh round). AMX: never (not measured there)."""
    if "amx_bf16" in target.flags:
        # AMX: oneDNN's bf16 GEMM already read at the bandwidth at M = 1-8 on the Emerald Rapids box (round 3);
        # the kernel is unmeasured there, so those targets keep the lowerings measured on them.
        return None
    if "avx512_bf16" in target.flags or ("avx2" in target.flags and "fma" in target.flags):
        return 1
    return None


def attention_kernel(target) -> bool:
    """Whether decode graphs for `target` call internvl::paged_decode_attention (kernels/paged_attention.cpp)
    instead of graphs/attention.py's multiply + sum: on AVX2 + FMA and AVX-512 targets without AMX (measured
    on Zen 4, 24 layers of 2B caches at batch 8 x 512 keys, 2 threads: 22-27 ms against the graph's 51-65
    inside Inductor; docs/performance.md, sixth round). AMX boxes keep what was measured on them."""
    return "amx_bf16" not in target.flags and "avx2" in target.flags and "fma" in target.flags


def gemm_kernel(target) -> bool:
    """Whether the compute-bound bf16 linears (vision, prefill chunks: more than MAX_ROWS rows) of graphs for
    `target` call internvl::linear_fp32 (kernels/fp32_gemm.cpp) where compile/passes/fp32_gemm.py widens them to
    fp32: on AVX2 + FMA (measured on an emulated AVX2 box, 1.1-1.5x the converted slices through MKL's sgemm,
    2.8-4x oneDNN's bf16 GEMM at 16-48 rows; the pass's docstring), AVX-512 without native bf16 (x86-64-v4)
    included, where its micro-kernel is built in zmm. Targets with native bf16 keep oneDNN's bf16 GEMM."""
    return "avx2" in target.flags and "fma" in target.flags


def gemm_takes(kernel: bool | None, target, native_bf16: bool, x, rows: int, quantized: bool = False) -> bool:
    """Whether a linear over `rows` rows of x (a fake tensor) calls internvl::linear_fp32 / _int8 / _int4: the pass's
    `kernel` option (None: gemm_kernel(target); True: any target; False: never), a CPU graph, and either bf16 x of
    more than MAX_ROWS rows (fewer: the small-M ops) in a graph for a target without native bf16 or, with `quantized`
    (int8 / int4 weights), fp32 x at any rows on any target (a caller with a better one-row lowering, int8's
    reduction over the int8 bytes, takes that first). For fp32 x the op replaces dequantised slices through MKL's
    sgemm: Zen 4, int8 weights, K = 2048, N = 8192, 2 threads, M = 473 / 48: 190-214 / 168-171 GFLOP/s against
    146-180 / 99-100; up to 8 rows (the op's unpacked small-M loop), 2 threads, M = 2 / 4 / 8: 1.3 / 1.6 / 3.5 ms
    against 7.4 / 9.5 / 11.0 (docs/performance.md, twelfth round)."""
    import torch
    use = gemm_kernel(target) if kernel is None else kernel
    if not use or x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16:
        return not native_bf16 and rows > MAX_ROWS
    return quantized and x.dtype == torch.float32


def least_rows(kernel: bool | None, target) -> int | None:
    """A pass's `kernel` option as the fewest rows a linear calls the kernel at: None -> the target's
    min_rows, True -> 1 (any target: tests), False -> None (never)."""
    return min_rows(target) if kernel is None else (1 if kernel else None)


def takes(least: int | None, x, rows: int, bias) -> bool:
    """Whether a linear over `rows` rows of x with `bias` (fake tensors, bias None or not) calls a kernels/ op:
    a CPU graph, bf16 activations and bias, least <= rows <= MAX_ROWS (least: least_rows; None: never)."""
    import torch
    return (least is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and least <= rows <= MAX_ROWS and (bias is None or bias.dtype == torch.bfloat16))


def op(name: str, target):
    """torch.ops.internvl.<name>.default for a graph, registered first from the library for `target`."""
    import torch
    ensure_built(target)
    return getattr(torch.ops.internvl, name).default


def build_flags(target) -> list[str]:
    march = "-march=native" if target.march == "native" else f"-march={target.march}"
    return [march, *target.extra_cflags, "-mtune=generic" if target.march != "native" else "-mtune=native"]


def build(dest: Path, flags: list[str]) -> Path:
    """Compile SOURCES into the shared library `dest` with g++ and `flags` (-march ...)."""
    import torch
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise KernelError(f"building the kernel library needs a C++ compiler ({cxx} not found; AOTInductor needs one too)")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, "-O3", "-shared", "-fPIC", "-std=c++20", "-fopenmp", *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *[f"-I{p}" for p in cpp_extension.include_paths()], *map(str, SOURCES),
           # libtorch's own libraries and OpenMP runtime, already loaded when the library is: never a second libgomp
           *[f"-L{p}" for p in cpp_extension.library_paths()], "-lc10", "-ltorch_cpu", "-o", str(dest)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise KernelError(f"building the kernel library failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    return dest


def cached_build(flags: list[str]) -> Path:
    """The library for `flags`, built once per source, flags and torch version."""
    import torch
    from ..runtime.bundle import CACHE_ENV, default_cache_base

    base = os.environ.get(CACHE_ENV) or default_cache_base()
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + repr((flags, torch.__version__, sys.platform)).encode()).hexdigest()
    path = Path(base) / "kernels" / key[:32] / "internvl_kernels.so"
    if not path.is_file():      # built beside its place, then renamed: a concurrent build never sees half a file
        os.replace(build(path.with_name(f".{os.getpid()}.tmp.so"), flags), path)
    return path


def load(path: Path, version: int = KERNELS_VERSION) -> None:
    """Register the library's ops in this process (once; see the module docstring)."""
    import torch

    if _loaded:
        if _loaded["version"] != version:
            raise KernelError(f"this process already runs kernels version {_loaded['version']} "
                              f"({_loaded['path']}); {path} is version {version}: run it in a process of its own")
        return
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise KernelError(f"kernel library {path} cannot be loaded ({e}): recompile the artifact") from e
    got = torch.ops.internvl.kernels_version()
    if got != version:
        raise KernelError(f"kernel library {path} is version {got}, its manifest says {version}: recompile the artifact")
    _loaded.update(path=str(path), version=version)


def ensure_built(target) -> None:
    """Compile side: the ops registered in this process (for export and AOTInductor), from the library
    for `target` (built, cached) unless one is loaded already: compiling needs only their schemas."""
    if not _loaded:
        load(library_for(target))


def library_for(target) -> Path:
    """The library an artifact for `target` ships (built for the target's -march, cached)."""
    return cached_build(build_flags(target))


def manifest_entry() -> dict:
    return {"library": KERNELS_LIBRARY, "version": KERNELS_VERSION, "ops": list(OPS)}


def load_for_artifact(artifact: Path, manifest: dict) -> None:
    """Runtime side: load the artifact's kernel library, if its graphs call one."""
    entry = manifest.get("compile", {}).get("lowering", {}).get("kernels")
    if not entry:
        return
    path = Path(artifact) / entry["library"]
    if not path.is_file():
        raise KernelError(f"{entry['library']} is missing from {artifact}: copy the whole artifact again")
    load(path, int(entry["version"]))


def uses_kernels(programs) -> bool:
    """Whether any exported program calls an op of this library."""
    return any(n.op == "call_function" and str(n.target).startswith("internvl.")
               for ep in programs for n in ep.graph.nodes)
