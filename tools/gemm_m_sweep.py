"""Decode GEMMs at M = 1, 2, 4, 8 rows, eager, over 24 layers of InternLM2-1.8B matrices (3.0 GB bf16, 1.5 GB int8:
from DRAM, not cache), ms per pass and GB/s of weights read: bf16 F.linear (oneDNN), ATen's int8 GEMM
(_weight_int8pack_mm, bf16 activations), kernels/' internvl::small_m_linear (bf16), small_m_linear_int8 and
small_m_linear_int4 (groups of 128: 0.53 bytes a weight); docs/performance.md third, fifth and seventh rounds:

    .venv/bin/python tools/gemm_m_sweep.py                      # all five
    VARIANTS=kernel,kernel_int8 TARGET=x86-64-v3 .venv/bin/python tools/gemm_m_sweep.py   # another target's kernels
    CFLAGS=-DINTERNVL_PREFETCH_BYTES=0 VARIANTS=kernel .venv/bin/python tools/gemm_m_sweep.py   # a build variant
    LIB=/tmp/old/internvl_kernels.so VARIANTS=kernel_int4 .venv/bin/python tools/gemm_m_sweep.py   # a library built before
"""
import os, time, torch, torch.nn.functional as F
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from internvl_aot import kernels
from internvl_aot.compile import targets
from internvl_aot.bench.measure import QUANT_BYTES_PER_WEIGHT
shapes=[(4096,2048),(2048,2048),(16384,2048),(2048,8192)]
L=24
variants=os.environ.get("VARIANTS", "bf16,int8pack,kernel,kernel_int8,kernel_int4").split(",")
if any(v.startswith("kernel") for v in variants):
    target = targets.resolve(os.environ.get("TARGET", "native"))
    # CFLAGS: a build with extra flags (e.g. -DINTERNVL_PREFETCH_BYTES=0) instead of the target's library
    extra = os.environ.get("CFLAGS", "").split()
    kernels.load(os.environ["LIB"] if os.environ.get("LIB") else
                 kernels.cached_build(kernels.build_flags(target) + extra) if extra else kernels.library_for(target))
W=[[torch.randn(N,K).to(torch.bfloat16) for N,K in shapes] for _ in range(L)]
Q=[[torch.randint(-127,127,(N,K),dtype=torch.int8) for N,K in shapes] for _ in range(L)]
S=[[torch.rand(N).bfloat16() for N,K in shapes] for _ in range(L)]
S32=[[s.float() for s in l] for l in S]
Q4=[[torch.randint(0,256,(N,K//2),dtype=torch.uint8) for N,K in shapes] for _ in range(L)]
S4=[[torch.rand(N,K//128) for N,K in shapes] for _ in range(L)]
def t(f, n=7):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
nb=sum(N*K for N,K in shapes)*L
for M in (1,2,4,8):
    xs=[torch.randn(M,K).bfloat16() for N,K in shapes]
    run={"bf16": lambda l, i: F.linear(xs[i], W[l][i]),
         "int8pack": lambda l, i: torch._weight_int8pack_mm(xs[i], Q[l][i], S[l][i]),
         "kernel": lambda l, i: torch.ops.internvl.small_m_linear(xs[i], W[l][i]),
         "kernel_int8": lambda l, i: torch.ops.internvl.small_m_linear_int8(xs[i], Q[l][i], S32[l][i]),
         "kernel_int4": lambda l, i: torch.ops.internvl.small_m_linear_int4(xs[i], Q4[l][i], S4[l][i], 128)}
    out=[]
    for v in variants:
        f=run[v]
        def all_layers():
            for l in range(L):
                for i in range(4): f(l, i)
        ms=t(all_layers); size=nb*QUANT_BYTES_PER_WEIGHT.get(v[-4:], 2)
        out.append(f"{v} {ms:.1f} ms ({size/ms/1e6:.1f} GB/s)")
    print(f"M={M}  " + "  ".join(out), flush=True)
