"""AOTInductor backend: exported programs -> weight-free `.pt2` packages + a constant map.

One package per graph (`<name>.pt2`), each built without its weights
(`aot_inductor.package_constants_in_so=False`). The runtime binds the tensors of the
artifact's one safetensors file to every graph as *user-managed* constants, so all graphs
of a rank read the same memory (runtime/graph_loader.py).

Why one package per graph and not `package_aoti({name: files, ...})` in one file:
torch 2.13 does support several models in one `.pt2` and loading one of them by name with
`torch._C._aoti.AOTIModelPackageLoader(path, name, ...)`, but torch's own
`load_package(path, name)` goes through `load_pt2`, which builds a runner for *every*
model in the archive; a single file also saves nothing on disk (the models' files are
simply concatenated) and forces a full rewrite when one bucket is recompiled.

Constant names: Inductor names each constant by the FQN it had in the exported module
(`layers.0.weight`), and `load_constants` takes those FQNs directly. Lifted tensor
constants are the exception (an attribute `plain` becomes `_tensor_constant0`), so the
names are taken from the compiler itself: `package_constants_on_disk_format=
"pickle_weights"` makes `aot_compile` return a `Weights` object (compiled FQN -> the tensor
it was compiled with). That object is *not* packaged (it would write the weights into the
`.pt2`); it only builds the constant map.

Non-parameter constants (non-persistent buffers such as a RoPE cos/sin table, lifted
tensor constants, anything a pass or Inductor created that is not in the state dict) go to
the safetensors file too, under `_aoti.<fqn>.<sha1[:12]>`: identical tables of different
buckets are stored once, and the runtime has a single way of binding tensors.

Each package carries `extra/internvl_aot_graph.json` (the constant map with dtypes and
shapes, the input specs, the torch version), so a package can be checked and bound without
the manifest; the runtime checks shapes itself because AOTInductor accepts a wrongly
shaped user-managed constant silently.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch._inductor
import torch._inductor.config
from torch.export import ExportedProgram

from internvl_aot.runtime.graph_loader import GRAPH_INFO_FILE, GRAPH_INFO_FORMAT

EXTRA_WEIGHT_PREFIX = "_aoti."

# Options for CPU (and CUDA) graphs. Callers may override any of them via `options`.
DEFAULT_OPTIONS: dict[str, object] = {
    # Weights live in the artifact's safetensors file, not in the .so.
    "aot_inductor.package_constants_in_so": False,
    # Freezing folds weights into new constants owned by the graph (a copy per graph) and
    # measured slower on CPU (2-core AVX512-BF16 EPYC, InternLM2-1.8B-shaped bf16 decode step: 763 ms
    # with freezing + weight prepack vs 456 ms without).
    "freezing": False,
    # Runtime constant folding would also create graph-owned copies of derived weights.
    "aot_inductor.use_runtime_constant_folding": False,
    # Autotuning multiplies compile time; the CPU GEMM templates it selects also bake the
    # compile machine's thread count into the blocking.
    "max_autotune": False,
    "max_autotune_gemm": False,
    # OpenMP regions use the calling thread's thread count at run time (torch.set_num_threads
    # / OMP_NUM_THREADS) instead of torch.get_num_threads() of the machine that compiled
    # (Inductor's default bakes `num_threads(N)` in unless N == os.cpu_count()).
    "cpp.dynamic_threads": True,
    # -gline-tables-only adds ~1 MB of debug sections per .so; re-enable for perf profiling.
    "aot_inductor.enable_line_tables": False,
}


@dataclass
class CompiledGraph:
    name: str
    package: str  # file name of the .pt2, relative to out_dir
    constants: dict[str, str]  # compiled constant FQN -> key in the artifact's weights file
    # Tensors the weights file must also hold (non-parameter constants), key -> tensor.
    extra_weights: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    compile_s: float = 0.0
    package_bytes: int = 0


def compile_graphs(
    programs: dict[str, ExportedProgram],
    out_dir: str | os.PathLike,
    device: str = "cpu",
    options: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, CompiledGraph]:
    """AOT-compile each exported program to `out_dir/<name>.pt2` (weights not included).

    Returns {name: CompiledGraph}. The artifact's weights file must hold, for every graph,
    each `constants` value: the state-dict keys of the exported programs plus
    `merged_extra_weights(result)`.
    """
    os.makedirs(out_dir, exist_ok=True)
    defaults = {k: v for k, v in DEFAULT_OPTIONS.items() if _known_option(k)}  # torch 2.11 lacks some
    opts = {**defaults, **_weights_return_option(), **(options or {}), "aot_inductor.package": True}
    if opts.get("aot_inductor.package_constants_in_so"):
        raise ValueError("compile_graphs never embeds weights: drop aot_inductor.package_constants_in_so")
    results: dict[str, CompiledGraph] = {}
    for i, (name, ep) in enumerate(programs.items(), 1):
        if not name.replace("_", "").isalnum():
            raise ValueError(f"graph name {name!r}: use letters, digits and '_' only")
        _check_device(name, ep, device)
        t0 = time.perf_counter()
        files, weights = _aot_compile(ep, dict(opts))
        constants, specs, extra = _constant_map(ep, weights)
        info = {
            "format": GRAPH_INFO_FORMAT,
            "graph": name,
            "torch_version": torch.__version__,
            "device": torch.device(device).type,
            "constants": specs,
            "inputs": _input_specs(ep),
        }
        package = f"{name}.pt2"
        path = os.path.join(out_dir, package)
        _package(path, files, info)
        seconds = time.perf_counter() - t0
        results[name] = CompiledGraph(
            name=name,
            package=package,
            constants=constants,
            extra_weights=extra,
            compile_s=seconds,
            package_bytes=os.path.getsize(path),
        )
        if progress is not None:
            progress(
                f"compiled {name} ({i}/{len(programs)}) in {seconds:.1f} s: "
                f"{len(constants)} constants, package {os.path.getsize(path) / 1e6:.1f} MB"
            )
    return results


def merged_extra_weights(compiled: dict[str, CompiledGraph]) -> dict[str, torch.Tensor]:
    """The non-parameter constants of all graphs, one tensor per distinct key."""
    merged: dict[str, torch.Tensor] = {}
    for graph in compiled.values():
        merged.update(graph.extra_weights)
    return merged


def _known_option(key: str) -> bool:
    obj = torch._inductor.config
    for part in key.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _weights_return_option() -> dict[str, object]:
    # Asks aot_compile to hand back the constants it compiled against (a `Weights` object).
    # torch >= 2.10 spells it package_constants_on_disk_format; 2.8/2.9 had a bool.
    aoti_config = torch._inductor.config.aot_inductor
    if hasattr(aoti_config, "package_constants_on_disk_format"):
        return {"aot_inductor.package_constants_on_disk_format": "pickle_weights"}
    return {"aot_inductor.package_constants_on_disk": True}


def _aot_compile(ep: ExportedProgram, opts: dict) -> tuple[list[str], dict]:
    from torch.export.pt2_archive._package_weights import Weights

    if ep.example_inputs is None:
        raise ValueError("the exported program has no example_inputs; export it with torch.export.export")
    args, kwargs = ep.example_inputs
    out = torch._inductor.aot_compile(ep.module(), args, kwargs, options=opts)
    files = [f for f in out if isinstance(f, str) and f]
    weights = [f for f in out if isinstance(f, Weights)]
    if len(weights) > 1:
        raise RuntimeError("aot_compile returned several Weights objects for one graph")
    # A graph without any constant yields no Weights object.
    return files, ({k: v[0] for k, v in weights[0].items()} if weights else {})


def _constant_map(ep: ExportedProgram, weights: dict[str, torch.Tensor]):
    state_dict = ep.state_dict
    constants: dict[str, str] = {}
    specs: dict[str, dict] = {}
    extra: dict[str, torch.Tensor] = {}
    for fqn, value in weights.items():
        if not value.is_contiguous():
            # The weights file stores contiguous tensors; the kernels assume the compiled stride.
            raise ValueError(f"constant {fqn} is not contiguous: make it contiguous before export")
        ref = state_dict.get(fqn)
        if ref is not None and _same_tensor(ref, value):
            key = fqn
        else:
            key = f"{EXTRA_WEIGHT_PREFIX}{fqn}.{_digest(value)}"
            extra[key] = value.detach().clone()  # its own storage, as safetensors wants
        constants[fqn] = key
        specs[fqn] = {"key": key, "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
    return constants, specs, extra


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return a.data_ptr() == b.data_ptr() or bool(torch.equal(a, b))


def _digest(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    h = hashlib.sha1(raw)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    return h.hexdigest()[:12]


def _input_specs(ep: ExportedProgram) -> list[dict]:
    user_inputs = set(ep.graph_signature.user_inputs)
    specs = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"graph input {node.name} is not a tensor; every stage input must be one")
        shape = [int(s) if isinstance(s, int) else None for s in val.shape]  # None: dynamic
        specs.append({"name": node.name, "dtype": str(val.dtype).removeprefix("torch."), "shape": shape})
    return specs


def _check_device(name: str, ep: ExportedProgram, device: str) -> None:
    want = torch.device(device).type
    for fqn, t in list(ep.state_dict.items()) + list(ep.constants.items()):
        if isinstance(t, torch.Tensor) and t.device.type != want:
            raise ValueError(f"graph {name}: {fqn} is on {t.device}, expected {want}; export on the target device")


def _package(path: str, files: list[str], info: dict) -> None:
    from torch.export.pt2_archive._package import package_pt2

    if os.path.exists(path):
        os.remove(path)
    package_pt2(path, aoti_files=files, extra_files={GRAPH_INFO_FILE: json.dumps(info)})
