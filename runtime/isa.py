"""CPU targets: which instruction sets an artifact's graphs may use, and whether this box has them.

A *target* names what the compiler may assume about the CPU that runs the artifact: the
`-march` it compiles the graphs' C++ with, the vector ISA Inductor generates code for
(`avx2`: 256-bit, `avx512`: 512-bit), and the CPU flags (as /proc/cpuinfo spells them) that
those choices need. `native` is the compiling box itself (`-march=native`: the artifact runs
only where every ISA flag of that box exists); the named x86-64 levels let one build server
compile for a fleet of other CPUs.

This module imports no torch (internvl-artifact check reads it without loading native code);
compile/targets.py applies a target to Inductor.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# x86-64 micro-architecture levels (the psABI's list), in /proc/cpuinfo's names: `pni` is SSE3,
# `abm` carries LZCNT. -march=x86-64-vN lets the compiler emit any instruction of these.
X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2")
X86_64_V3 = X86_64_V2 + ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
X86_64_V4 = X86_64_V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")

# Flags that give the CPU native bf16 arithmetic (a fast bf16 GEMM in oneDNN, bf16 dot products
# in generated code). Without them PyTorch's bf16 matmul has no fast path (on an AVX2-only Zen 3 its
# bf16 GEMM ran about 7x slower than fp32; docs/performance.md).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Target:
    name: str
    march: str                # the compiler's -march
    vec_isa: str              # Inductor's vector ISA: "avx2" | "avx512" ("" for native: the build box's pick)
    flags: tuple[str, ...]    # CPU flags the generated code may use (every one is required to run it)
    native_bf16: bool         # the target has native bf16 arithmetic
    extra_cflags: tuple[str, ...] = ()
    description: str = ""


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("x86-64-v3", "x86-64-v3", "avx2", X86_64_V3, native_bf16=False,
           description="AVX2 + FMA + F16C (Haswell and later, AMD Zen 1-3)"),
    Target("x86-64-v4", "x86-64-v4", "avx512", X86_64_V4, native_bf16=False,
           description="AVX-512 F/BW/CD/DQ/VL (Skylake-SP and later, AMD Zen 4)"),
    Target("x86-64-v4-bf16", "x86-64-v4", "avx512", X86_64_V4 + ("avx512_bf16",), native_bf16=True,
           extra_cflags=("-mavx512bf16",),
           description="x86-64-v4 + AVX512-BF16 (Cooper Lake, Sapphire Rapids and later, AMD Zen 4)"),
)}
TARGET_NAMES = ("native",) + tuple(TARGETS)


def cpuinfo_path() -> Path:
    # INTERNVL_CPUINFO: read another box's /proc/cpuinfo instead (to ask "could that box run it?"
    # on a build server, and for tests).
    return Path(os.environ.get("INTERNVL_CPUINFO") or "/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """Every flag of this CPU, as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        text = cpuinfo_path().read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in cpuinfo_path().read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_target(build_isa: list[str]) -> Target:
    """The build box as a target; `build_isa` are its flags as the manifest records them."""
    return Target("native", "native", "", tuple(build_isa),
                  native_bf16=any(f in build_isa for f in BF16_FLAGS),
                  description="the compiling box's CPU (-march=native)")


def get_target(name: str) -> Target:
    if name == "native":
        raise ValueError("native is the build box: use native_target(flags)")
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGET_NAMES)}") from None


def missing_flags(required, have: set[str] | None = None) -> list[str]:
    have = cpu_flags() if have is None else have
    return [f for f in required if f not in have]


def targets_this_box_runs(have: set[str] | None = None) -> list[str]:
    have = cpu_flags() if have is None else have
    return [t.name for t in TARGETS.values() if not missing_flags(t.flags, have)]


def cpu_problem(device: dict, have: set[str] | None = None) -> str | None:
    """None if this CPU can run a CPU artifact with manifest `device`, else a one-line reason
    naming the missing flags and what to do."""
    if device.get("machine") and device["machine"] != platform.machine():
        return (f"artifact was compiled for {device['machine']} CPUs, this is {platform.machine()}: "
                "re-compile the artifact on this machine")
    have = cpu_flags() if have is None else have
    missing = missing_flags(device.get("isa", []), have)
    if not missing:
        return None
    target = device.get("target", "native")
    fits = targets_this_box_runs(have)
    advice = (f"re-compile the artifact on this machine or for a target it has (TARGET={fits[-1]})" if fits
              else "re-compile the artifact on this machine")
    return (f"artifact was compiled for target {target}, which needs CPU flags this CPU lacks: "
            f"{', '.join(missing)}: {advice}")
