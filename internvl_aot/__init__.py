"""internvl_aot: an ahead-of-time graph compiler and runtime for InternVL.

The import package is assembled from the repository's top-level folders by a
setuptools package-dir mapping (see pyproject.toml):

    internvl_aot.graphs   <- graphs/    the model as static-shape PyTorch graphs
    internvl_aot.compile  <- compile/   checkpoint -> export -> passes -> artifact
    internvl_aot.runtime  <- runtime/   artifact -> tokens (ships to edge boxes)
"""
import os as _os

# torch_npu registers itself to be imported by `import torch` (the torch.backends entry point);
# installed without the CANN libraries, that import fails and takes `import torch` with it. Only
# the NPU backend (compile/backends/npu.py) uses torch_npu, and it imports it by name, so the
# autoload is off in every process that imports this package first (an explicit setting wins).
_os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# The compiled graphs' OpenMP threads wait for each other at every parallel region (a decode step
# runs thousands). libgomp's default is to spin ~300,000 iterations before sleeping: where another
# process wants a core, a spinning waiter takes it from the thread it waits for. Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE, this package's default until the sixth round) pays a futex wake-up at every
# region instead. Measured on 2B bf16 decode through the kernels/ ops (2 threads, Zen 4, ~480-token
# prompt, docs/performance.md sixth round), ms per step, idle batch 1 / batch 8 and batch 1 beside one
# busy process: passive 115-116 / 137-139 and 179-180; GOMP_SPINCOUNT=1000 93-95 / 123-124 and 197-198;
# 3000 93-94 / 122 and 238; 10000 93-95 / 120-121 and 362-381; libgomp's default 113 / 133 and 264.
# So a short spin (about a microsecond) before sleeping: 1.2x passive idle, 0.9x beside a busy
# neighbour. libgomp reads it when torch loads: it works for processes that import this package before
# torch (every internvl-* command); an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "1000"

__version__ = "0.1.0"
