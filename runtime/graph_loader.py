"""Load the artifact's weights once and bind them to every compiled graph, without copies.

The `.pt2` packages hold no weights (compile/aoti.py builds them with
`aot_inductor.package_constants_in_so=False`). `load_graph` hands each graph the tensors
of the one weights dict as AOTInductor *user-managed* constants: the graph keeps a pointer
to the tensor, never a copy, so N graphs of a rank cost the weights once. Consequences:
- changing a weight tensor in place changes what every graph computes;
- rebinding a dict entry (`weights[k] = other`) changes nothing: graphs hold the old tensor,
  and AOTInductor (2.13) keeps a reference to it for the life of the process.

On CPU the weights are memory-mapped from the safetensors file (copy-on-write private
mapping: no copy, pages are read on first use and the kernel may drop clean ones under
memory pressure). Do not overwrite an artifact in place while a process serves it.

Threads: packages are compiled with `cpp.dynamic_threads`, so their OpenMP regions use the
calling thread's OpenMP thread count: call `torch.set_num_threads(n)` (or set
OMP_NUM_THREADS before start) in the thread that runs the graphs; extern ops inside the
graph (matmuls via oneDNN/BLAS) follow the same setting.

This module imports only torch and safetensors (it ships to edge boxes).
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import torch
import torch.utils._pytree as pytree

from . import weights_file

# Shared with compile/aoti.py, which writes this file into every package.
GRAPH_INFO_FILE = "internvl_aot_graph.json"
GRAPH_INFO_FORMAT = 1


class GraphLoadError(RuntimeError):
    """A package or weights file that cannot be used; the message says what to do."""


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read the artifact's safetensors file once (memory-mapped on CPU)."""
    from safetensors import SafetensorError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GraphLoadError(f"weights file {path} not found: point --artifact at a compiled artifact directory")
    try:
        return weights_file.read(path, device=str(torch.device(device)))
    except (SafetensorError, OSError, ValueError) as e:
        raise GraphLoadError(f"weights file {path} is unreadable ({e}): recompile the artifact") from e


def read_graph_info(pt2_path: str | os.PathLike) -> dict[str, Any]:
    """The graph description compile/aoti.py stored in the package (constants, inputs, torch version)."""
    path = os.fspath(pt2_path)
    if not os.path.isfile(path):
        raise GraphLoadError(f"graph package {path} not found: recompile the artifact")
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{GRAPH_INFO_FILE}")]
            if not names:
                raise GraphLoadError(f"{path} was not built by internvl_aot's compiler: recompile the artifact")
            info = json.loads(z.read(names[0]))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, KeyError) as e:
        raise GraphLoadError(f"graph package {path} is corrupt or truncated ({e}): recompile the artifact") from e
    if info.get("format") != GRAPH_INFO_FORMAT:
        raise GraphLoadError(
            f"{path} uses graph format {info.get('format')}, this runtime reads {GRAPH_INFO_FORMAT}: "
            "recompile the artifact with this version of internvl_aot"
        )
    return info


class LoadedGraph:
    """A compiled graph bound to shared weights; call it with the graph's positional inputs."""

    def __init__(self, name: str, loader: Any, info: dict, bound: dict[str, torch.Tensor], check_inputs: bool):
        self.name = name
        self.info = info
        self.device_type = info["device"]
        self._loader = loader
        self._bound = bound  # keeps the user-managed tensors alive and inspectable
        self._out_spec = pytree.treespec_loads(loader.get_call_spec()[1])
        self._inputs = [
            (spec["name"], getattr(torch, spec["dtype"]), tuple(spec["shape"])) for spec in info["inputs"]
        ]
        self.check_inputs = check_inputs

    @property
    def input_signature(self) -> list[tuple[str, torch.dtype, tuple]]:
        """(name, dtype, shape) of each input as compiled; None marks a dynamic dimension."""
        return list(self._inputs)

    @property
    def constants(self) -> dict[str, torch.Tensor]:
        return dict(self._bound)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self.check_inputs:
            self._check(inputs)
        # AOTInductor does not check inputs: a wrong shape or dtype reads or writes out of bounds.
        outputs = self._loader.boxed_run(list(inputs))
        return pytree.tree_unflatten(outputs, self._out_spec)

    def _check(self, inputs: tuple) -> None:
        if len(inputs) != len(self._inputs):
            raise TypeError(f"graph {self.name} takes {len(self._inputs)} inputs, got {len(inputs)}")
        for t, (name, dtype, shape) in zip(inputs, self._inputs):
            ok = (
                isinstance(t, torch.Tensor)
                and t.dtype == dtype
                and t.dim() == len(shape)
                and all(want is None or want == got for want, got in zip(shape, t.shape))
                and t.device.type == self.device_type
                and t.is_contiguous()
            )
            if not ok:
                got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                want = ["*" if s is None else s for s in shape]
                raise ValueError(
                    f"graph {self.name} input {name}: expected a contiguous {dtype} {want} on "
                    f"{self.device_type}, got {got}"
                )


def load_graph(
    pt2_path: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    constant_map: dict[str, str] | None = None,
    device: str | torch.device = "cpu",
    *,
    single_threaded: bool = False,
    check_inputs: bool = True,
) -> LoadedGraph:
    """Load one `.pt2` and bind `weights` to it as user-managed constants (no copy).

    constant_map: compiled constant FQN -> key in `weights` (the manifest's copy); by
    default the map stored in the package. single_threaded: skip the model container's
    locking (AOTInductor's run_single_threaded); only when one thread calls this graph.
    """
    path = os.fspath(pt2_path)
    info = read_graph_info(path)
    name = info.get("graph", os.path.basename(path))
    built, here = info["torch_version"].split("+")[0], torch.__version__.split("+")[0]
    if built != here:
        raise GraphLoadError(
            f"graph {name} ({path}) was built by torch {info['torch_version']}, this is torch "
            f"{torch.__version__}: recompile the artifact with this torch or install torch=={built}"
        )
    device = torch.device(device)
    if device.type != info["device"]:
        raise GraphLoadError(f"graph {name} was compiled for {info['device']}, not {device.type}: compile for {device.type}")

    bound = _bind(name, info, weights, constant_map, device)
    loader = _open(path, name, device, single_threaded)
    package_fqns = set(loader.get_constant_fqns())
    if package_fqns != set(bound):
        raise GraphLoadError(
            f"graph {name}: package constants differ from its description "
            f"({sorted(package_fqns ^ set(bound))[:5]}): recompile the artifact"
        )
    try:
        # (constants, use_inactive, check_full_update, user_managed)
        loader.load_constants(bound, False, True, True)
    except RuntimeError as e:
        raise GraphLoadError(f"graph {name}: binding weights failed ({e}): recompile the artifact") from e
    return LoadedGraph(name, loader, info, bound, check_inputs)


def _bind(name: str, info: dict, weights: dict, constant_map: dict | None, device: torch.device) -> dict:
    bound: dict[str, torch.Tensor] = {}
    for fqn, spec in info["constants"].items():
        key = spec["key"] if constant_map is None else constant_map.get(fqn)
        if key is None:
            raise GraphLoadError(f"graph {name}: constant map has no entry for {fqn}: recompile the artifact")
        t = weights.get(key)
        if t is None:
            raise GraphLoadError(f"graph {name} needs weight {key!r}, absent from the weights file: recompile the artifact")
        dtype = getattr(torch, spec["dtype"])
        if t.dtype != dtype or list(t.shape) != spec["shape"] or not t.is_contiguous():
            raise GraphLoadError(
                f"graph {name}: weight {key!r} is {t.dtype} {list(t.shape)}, the graph was compiled for "
                f"contiguous {dtype} {spec['shape']}: weights and graphs come from different compiles, recompile"
            )
        if t.device.type != device.type:
            raise GraphLoadError(f"graph {name}: weight {key!r} is on {t.device}, load the weights on {device}")
        if t.dtype is torch.int8 and t.data_ptr() % weights_file.INT8_ALIGN:
            # the int8 GEMM would crash on it (runtime/weights_file.py)
            raise GraphLoadError(
                f"graph {name}: int8 weight {key!r} is not {weights_file.INT8_ALIGN}-byte aligned in memory "
                "(an artifact written before the aligned weights file): recompile the artifact")
        bound[fqn] = t
    return bound


def _open(path: str, name: str, device: torch.device, single_threaded: bool) -> Any:
    index = device.index if device.index is not None else -1
    cls = torch._C._aoti.AOTIModelPackageLoader
    try:
        try:
            return cls(path, "model", single_threaded, 1, index)
        except TypeError:  # older torch: (path, model_name) only
            return cls(path, "model")
    except RuntimeError as e:
        raise GraphLoadError(f"graph {name}: cannot load {path} ({str(e).splitlines()[0]}): recompile the artifact") from e
