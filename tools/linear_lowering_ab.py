"""Linear lowerings inside AOTInductor at M rows, 24 layers of InternLM2-1.8B matrices (weights bound from an aligned
weights file, as the runtime does): int8 `reduce` (small_m_linear's reduction over int8), int8 `pack`
(_weight_int8pack_mm), int8 `sliced` (dequantised slices + GEMM), `bf16` (oneDNN linear), `bf16_reduce`
(small_m_linear over bf16), `kernel` (kernels/' internvl::small_m_linear); docs/performance.md third round:

    .venv/bin/python tools/linear_lowering_ab.py 1 reduce,pack,bf16,bf16_reduce     # M=1; L=24 layers by env
    TARGET=x86-64-v3 .venv/bin/python tools/linear_lowering_ab.py 1 bf16_reduce,kernel   # graphs for another target
"""
import time, sys, torch, os, tempfile
torch.set_num_threads(2)
from internvl_aot.compile.passes import small_m_linear, int8_weights
from internvl_aot.runtime import weights_file
import torch.nn.functional as F
shapes=[(4096,2048),(2048,2048),(16384,2048),(2048,8192)]
L=int(os.environ.get("L","24"))
class Layer(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.lin=torch.nn.ModuleList([torch.nn.Linear(K,N,bias=False) for N,K in shapes])
class LM(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.layers=torch.nn.ModuleList([Layer() for _ in range(L)])
class Mod(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.language_model=LM()
    def forward(s,x,z):
        outs=[]
        for l in s.language_model.layers:
            for i in range(4): outs.append(l.lin[i](z if i==3 else x))
        return outs
M=int(sys.argv[1])
m=Mod().eval().bfloat16().requires_grad_(False)
args=(torch.randn(M,2048).bfloat16(),torch.randn(M,8192).bfloat16())
def timeit(f,n=9):
    for _ in range(2): f()
    ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
import torch._inductor.config as ic
from internvl_aot.compile import targets
target = targets.resolve(os.environ.get("TARGET", "native"))
wpath = os.path.join(tempfile.gettempdir(), 'int8_one_row_ab.safetensors')
for variant in sys.argv[2].split(","):
    ep=torch.export.export(m,args)
    if variant=="reduce":
        ep,rep=int8_weights.apply(ep, native_bf16=True, pack_min_rows=99); ep,rep2=small_m_linear.apply(ep, max_rows=1)
    elif variant=="pack":
        ep,rep=int8_weights.apply(ep, native_bf16=True, pack_min_rows=1)
    elif variant=="sliced":
        ep,rep=int8_weights.apply(ep, native_bf16=True, pack_rows=0)
    elif variant=="bf16":
        rep={}
    elif variant=="bf16_reduce":
        ep,rep=small_m_linear.apply(ep, max_rows=M, kernel=False)
    elif variant=="kernel":
        with targets.activate(target):
            ep,rep=small_m_linear.apply(ep, kernel=True)
    print(variant, {k:v for k,v in rep.items() if k!="example"}, flush=True)
    consts={**ep.state_dict, **ep.constants}
    with ic.patch({"aot_inductor.package_constants_in_so": False}), targets.activate(target):
        p=torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tempfile.gettempdir(), f"q{variant}{M}.pt2"))
    weights_file.write({k:v.detach().contiguous() for k,v in consts.items()}, wpath)
    w=weights_file.read(wpath)
    loader=torch._C._aoti.AOTIModelPackageLoader(p, "model", False, 1, -1)
    fq=loader.get_constant_fqns()
    # constant fqns in the package are the state dict keys with '.' -> '_'? map by normalized name
    norm={k.replace(".","_"):v for k,v in w.items()}
    bound={f:(w[f] if f in w else norm[f.replace(".","_")]) for f in fq}
    loader.load_constants(bound, False, True, True)
    with torch.no_grad():
        print(variant, "M",M, f"{timeit(lambda: loader.run(list(args))):.1f} ms for 24 layers", flush=True)
    os.remove(p)
os.remove(wpath)
