"""Decode tok/s of an artifact at given batch sizes, text prompt, EOS ignored (docs/performance.md, int8 section):

    .venv/bin/python tools/decode_ab.py ARTIFACT 1,4        # N=16 tokens, T=2 threads by env
    CTX=4096 .venv/bin/python tools/decode_ab.py ARTIFACT 1,8   # decode through the context bucket >= 4096
    LONG=150 .venv/bin/python tools/decode_ab.py ARTIFACT 8       # a longer prompt (150: 2,017 tokens)
"""
import sys, os, json
import internvl_aot  # noqa: F401  (before torch: its OpenMP wait setting, internvl_aot/__init__.py)
import torch
torch.set_num_threads(int(os.environ.get("T", "2")))
from internvl_aot.runtime.buckets import BucketPolicy
from internvl_aot.runtime.engine import Engine, Request
if os.environ.get("CTX"):
    _decode_key = BucketPolicy.decode_key
    BucketPolicy.decode_key = lambda self, batch, longest: _decode_key(self, batch, max(longest, int(os.environ["CTX"])))
from internvl_aot.runtime.sampler import SamplingParams
from internvl_aot.runtime.sequence import Status
eng = Engine.from_artifact(sys.argv[1], skip_verify=True)
eng.generate([Request(prompt="Hi", params=SamplingParams(max_new_tokens=3, ignore_eos=True))])
for B in [int(b) for b in sys.argv[2].split(",")]:
    req = Request(prompt="Tell me about the weather today." + " and the sea" * int(os.environ.get("LONG", "0")), params=SamplingParams(max_new_tokens=int(os.environ.get("N", "16")), ignore_eos=True))
    seqs = [eng.make_sequence(req) for _ in range(B)]
    for s in seqs: eng.scheduler.add(s)
    dec, toks = [], 0
    while any(s.status is not Status.FINISHED for s in seqs):
        r = eng.step()
        if r.kind == "decode": dec.append(r.seconds); toks += r.new_tokens
    dec.sort()
    print(json.dumps({"art": sys.argv[1].split("/")[-1], "B": B, "tok_s": round(toks / sum(dec), 2), "ms_med": round(dec[len(dec)//2]*1e3, 1), "load": round(os.getloadavg()[0], 1), "out": seqs[0].output_ids[:6]}), flush=True)
