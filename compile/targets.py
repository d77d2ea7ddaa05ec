"""Compile for another CPU: apply a target (runtime/isa.py) to Inductor while graphs compile.

Two things decide which instructions an AOTInductor CPU graph contains:
- the C++ compiler's `-march` (Inductor: `config.cpp.march`; None means `-march=native`), which
  lets gcc emit anything the named CPU has, in the graphs' kernels and in the wrapper;
- Inductor's vector ISA (`cpu_vec_isa.pick_vec_isa()`): the `at::vec::Vectorized` width the
  kernels are generated for, and its own `-mavx512f ...` / `-mavx2 -mfma -mf16c` flags added to
  the command line. It is the first entry of `valid_vec_isa_list()` (probed on the build box)
  unless `cpp.simdlen` or `ATEN_CPU_CAPABILITY` pick another; on an AMX box both "512" and
  "avx512" pick VecAMX (with `-mamx-tile -mavx512bf16 -mavx512vnni`), so neither lever gives a
  plain AVX-512 build, and neither can name an ISA the build box lacks.
So for a named target the vector ISA list is replaced by the one ISA the target wants (built
with exactly the target's flags; the dlopen probe is skipped, as the build box need not run it),
and `cpp.march` is set. `native` changes nothing (today's behaviour).

`current()` tells the compile pipeline (passes, lowerings) which target it compiles for, e.g.
`current().native_bf16`: a target without native bf16 must not get graphs that fall into
PyTorch's slow bf16 GEMM.
"""
from __future__ import annotations

import contextlib
import os
from unittest import mock

from ..runtime.isa import Target, get_target, native_target
from ..runtime.manifest import cpu_isa

_current: Target | None = None


def resolve(name: str) -> Target:
    return native_target(cpu_isa()) if name == "native" else get_target(name)


def current() -> Target:
    """The target being compiled for (native outside `activate`)."""
    return _current or native_target(cpu_isa())


def _vec_isa_for(target: Target):
    from torch._inductor import cpu_vec_isa as v

    if target.vec_isa == "avx2":
        class TargetAVX2(v.VecAVX2):
            _arch_flags = " ".join(("-mavx2 -mfma -mf16c",) + target.extra_cflags)
        return TargetAVX2()
    if target.vec_isa == "avx512":
        bf16 = "-mavx512bf16" in target.extra_cflags

        class TargetAVX512(v.VecAVX512):
            # VecAVX512 probes the *build box* for avx512_bf16 and adds -mavx512bf16 when it has
            # it; the target decides instead.
            _arch_flags = " ".join((v.VecAVX512._arch_flags,) + target.extra_cflags)
            _is_avx512_bf16_supported = bf16

            def __bool__(self) -> bool:
                return True

            def is_avx512_bf16_supported(self) -> bool:
                return bf16

            def build_arch_flags(self) -> str:
                return self._arch_flags
        return TargetAVX512()
    raise ValueError(f"target {target.name}: unknown vector ISA {target.vec_isa!r}")


@contextlib.contextmanager
def activate(target: Target):
    """Inductor compiles for `target` inside this block."""
    global _current
    import torch._inductor.config as cfg
    from torch._inductor import cpu_vec_isa

    prev = _current
    _current = target
    if target.name == "native":
        try:
            yield target
        finally:
            _current = prev
        return
    isa = _vec_isa_for(target)
    capability = os.environ.pop("ATEN_CPU_CAPABILITY", None)     # it would override the target's vector ISA
    with mock.patch.object(cpu_vec_isa, "valid_vec_isa_list", lambda: [isa]), \
            cfg.patch({"cpp.march": target.march, "cpp.simdlen": None, "cpp.vec_isa_ok": True,
                       # the FX graph cache's key does not hold the vector ISA: never reuse another target's code
                       "fx_graph_cache": False}):
        try:
            yield target
        finally:
            _current = prev
            if capability is not None:
                os.environ["ATEN_CPU_CAPABILITY"] = capability
