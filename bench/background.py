"""A documented background load for benchmarks of a shared box: N busy processes beside the engines.

An edge box runs other processes. `internvl-bench --background-load 1` starts one process that
spins on a core for the whole run (at `--background-nice`, default 0: an equal competitor; 19 is a
polite one, like a nice'd batch job), so every engine of the run is measured beside the same
neighbour. The spinners are plain Python loops (one core each, no memory traffic to speak of):
they take CPU time, not bandwidth, which is what breaks an OpenMP team whose threads wait for each
other at every barrier.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

SPIN = "import os, sys\nos.nice(int(sys.argv[1]))\nwhile True:\n    pass\n"


@contextlib.contextmanager
def background_load(n: int, nice: int = 0):
    """n busy processes while the block runs; -> their description for the benchmark's JSON."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN, str(nice)], stdin=subprocess.DEVNULL)
             for _ in range(max(0, n))]
    try:
        yield {"processes": n, "nice": nice, "kind": "python busy loop, one core each",
               "pids": [p.pid for p in procs]}
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


OMP_WAIT_CHOICES = ("active", "passive", "spin1000", "spin10000", "libgomp-default")


def omp_env(policy: str | None) -> None:
    """The OpenMP wait policy of the engine processes started after this (libgomp reads it when it
    loads, so it must be in their environment, not set from inside them). None: as the environment
    says (this package sets GOMP_SPINCOUNT=1000 unless told otherwise: internvl_aot/__init__.py);
    active/passive: OMP_WAIT_POLICY; spinN: GOMP_SPINCOUNT=N; libgomp-default: neither."""
    if not policy:
        return
    os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ.pop("GOMP_SPINCOUNT", None)
    if policy in ("active", "passive"):
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    elif policy.startswith("spin"):
        os.environ["GOMP_SPINCOUNT"] = policy[len("spin"):]
