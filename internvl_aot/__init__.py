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

__version__ = "0.1.0"
