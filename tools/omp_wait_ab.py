"""Batch-1 decode tok/s under OpenMP wait settings, one process each (docs/performance.md, "A shared box"):

    CONFIGS="[(2,'SPIN300000'),(2,None),(2,'PASSIVE'),(1,None)]" N=12 .venv/bin/python tools/omp_wait_ab.py ARTIFACT
(threads, setting): None = the package default; SPINn = GOMP_SPINCOUNT=n; else OMP_WAIT_POLICY.
"""
import os, sys, subprocess
ART = sys.argv[1]
CHILD = r'''
import os, sys, time, json, torch
torch.set_num_threads(int(sys.argv[2]))
from internvl_aot.runtime.engine import Engine, Request
from internvl_aot.runtime.sampler import SamplingParams
from internvl_aot.runtime.sequence import Status
eng = Engine.from_artifact(sys.argv[1], skip_verify=True)
req = Request(prompt="Tell me about the weather today.", params=SamplingParams(max_new_tokens=int(sys.argv[3]), ignore_eos=True))
eng.generate([Request(prompt="Hi", params=SamplingParams(max_new_tokens=2, ignore_eos=True))])
s = eng.make_sequence(req); eng.scheduler.add(s)
dec = []
while s.status is not Status.FINISHED:
    r = eng.step()
    if r.kind == "decode": dec.append(r.seconds)
print(json.dumps({"decode_tok_s": round(len(dec)/sum(dec), 3), "ms_med": round(sorted(dec)[len(dec)//2]*1e3, 1)}))
'''
import ast
configs = ast.literal_eval(os.environ.get("CONFIGS", "[(2, None), (2, 'PASSIVE'), (1, None), (2, 'ACTIVE')]"))
for rep in range(int(os.environ.get("REPS", "1"))):
    for threads, pol in configs:
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if pol and pol.startswith("SPIN"): env["GOMP_SPINCOUNT"] = pol[4:]
        elif pol: env["OMP_WAIT_POLICY"] = pol
        la = os.getloadavg()[0]
        out = subprocess.run([sys.executable, "-c", CHILD, ART, str(threads), os.environ.get("N", "12")], env=env,
                             capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
        print(f"threads={threads} wait={pol or 'default'} load={la:.1f}: {line}", flush=True)
