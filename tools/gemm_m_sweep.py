"""bf16 F.linear (oneDNN) against ATen's int8 GEMM (_weight_int8pack_mm, bf16 activations) at M = 1, 2, 4, 8 rows,
eager, over 24 layers of InternLM2-1.8B matrices (2.2 GB bf16: from DRAM, not cache); docs/performance.md third round:

    .venv/bin/python tools/gemm_m_sweep.py
"""
import time, torch, torch.nn.functional as F
torch.set_num_threads(2)
shapes=[(4096,2048),(2048,2048),(16384,2048),(2048,8192)]
L=24
W=[[torch.randn(N,K).to(torch.bfloat16) for N,K in shapes] for _ in range(L)]
Q=[[torch.randint(-127,127,(N,K),dtype=torch.int8) for N,K in shapes] for _ in range(L)]
S=[[torch.rand(N).bfloat16() for N,K in shapes] for _ in range(L)]
def t(f, n=7):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
for M in (1,2,4,8):
    xs=[torch.randn(M,K).bfloat16() for N,K in shapes]
    def bf():
        for l in range(L):
            for i in range(4): F.linear(xs[i],W[l][i])
    def q8():
        for l in range(L):
            for i in range(4): torch._weight_int8pack_mm(xs[i],Q[l][i],S[l][i])
    b=t(bf); q=t(q8); nb=sum(N*K for N,K in shapes)*L
    print(f"M={M} bf16 {b:.1f} ms ({nb*2/b/1e6:.1f} GB/s)  int8pack {q:.1f} ms ({nb/q/1e6:.1f} GB/s)", flush=True)
