"""Vision and prefill seconds of one 1-tile request through Engine.step() (docs/performance.md, emulated AVX2):

    T=1 .venv/bin/python tools/ttft_steps.py ARTIFACT
    TILES=0 ... (text only: the question alone)
"""
import sys, collections, os
import internvl_aot  # noqa: F401  (before torch: the package's OpenMP wait policy, as internvl-run has it)
import torch
torch.set_num_threads(int(os.environ.get("T", "1")))
from internvl_aot.runtime.engine import Engine, Request
from internvl_aot.runtime.sampler import SamplingParams
from internvl_aot.runtime.sequence import Status
from PIL import Image
eng = Engine.from_artifact(sys.argv[1], skip_verify=True)
img = Image.new("RGB", (448, 448), (120, 30, 200))
tiles = int(os.environ.get("TILES", "1"))
req = Request(prompt="Describe the image in detail.", images=[img] if tiles else [], max_tiles=max(tiles, 1), params=SamplingParams(max_new_tokens=2, ignore_eos=True))
for rep in range(int(os.environ.get("REPS", "1"))):
    recs = collections.defaultdict(list)
    s = eng.make_sequence(req); eng.scheduler.add(s)
    while s.status is not Status.FINISHED:
        r = eng.step(); recs[r.kind].append(r.seconds)
    print(sys.argv[1], {k: (len(v), round(sum(v), 2)) for k, v in recs.items()}, "tokens", len(s.prompt_ids), flush=True)
