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
# process wants a core, a spinning waiter takes it from the thread it waits for. Measured (2B bf16
# decode, 2 threads, docs/performance.md "A shared box"): idle 4.06 tok/s default spin, 4.33 spin
# 10,000, 4.35 passive; beside one busy process 1.25 / 1.31 / 2.16 (1 thread: 2.15); among other
# engineers' jobs (load 4-6) 0.17-0.26 / 1.16 / 1.18-1.24. So passive waiting, which costs nothing
# idle. libgomp reads it when torch loads: it works for processes that import this package before
# torch (every internvl-* command); an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

__version__ = "0.1.0"
