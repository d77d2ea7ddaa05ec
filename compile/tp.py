"""Tensor parallelism at compile time: which TP sizes fit a model, one weight shard per rank,
and one compile for all ranks.

`shard_weights(cfg, weights, n)` cuts canonical weights into the shards that
`build_model(cfg, shard, TPInfo(rank, n, group))` expects. The sharding rules (which tensor is
cut by rows, which by columns, what is replicated or zero-padded, which KV head a rank holds)
are written once, in docs/CONTRACTS.md "Tensor parallelism"; this module implements them. The
fusion passes later fuse each rank's q/k/v and gate/up into one linear, as at world size 1.

Compiling: every rank's graph is the same program (rank-dependent values are weights), so
rank 0's graphs are compiled and the other ranks reuse the packages after a structural check;
a rank whose program differs is compiled on its own. The graphs are compiled while a "fake"
process group of the right size is registered under the name the runtime's default group
will have ("0"); the runtime checks that name at start-up.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import zipfile
from pathlib import Path

import torch
from torch.export import ExportedProgram

from ..graphs.config import ModelConfig
from ..graphs.parallel import TPInfo
from .aoti import EXTRA_WEIGHT_PREFIX, CompiledGraph

# AOTInductor options for graphs with collectives. Every buffer a collective touches must stay
# invisible to Python: a gloo worker thread that drops the last reference to a tensor Python
# has seen needs the GIL, which a running graph holds -> deadlock. Without buffer reuse and
# in-place kernels, a collective's buffer is never handed to another value, and check_outputs
# proves that no graph output is one.
# always_keep_tensor_constants: Inductor would otherwise bake small 1-D weights (<= 8 values, e.g. the
# per-rank vocabulary offset) into the code as literals, and rank 0's code would not fit rank 1.
TP_COMPILE_OPTIONS = {"allow_buffer_reuse": False, "inplace_buffers": False, "always_keep_tensor_constants": True}


# ---------------------------------------------------------------------------------- validity
def tp_problem(cfg: ModelConfig, n: int) -> str | None:
    """Why TP=n cannot shard this model's LLM, or None when it can."""
    llm = cfg.llm
    if n < 1:
        return "TP must be at least 1"
    if llm.num_heads % n:
        return f"its LLM has {llm.num_heads} attention heads, which do not divide by {n}"
    kv = llm.num_kv_heads
    if kv % n and n % kv:
        return (f"its LLM has {kv} KV heads: TP must divide them, or be a multiple of them "
                f"(then each KV head is replicated on TP/{kv} ranks)")
    return None


def valid_tp_sizes(cfg: ModelConfig) -> list[int]:
    return [n for n in range(1, cfg.llm.num_heads + 1) if tp_problem(cfg, n) is None]


def check_tp(cfg: ModelConfig, n: int) -> None:
    problem = tp_problem(cfg, n)
    if problem:
        sizes = ", ".join(str(s) for s in valid_tp_sizes(cfg))
        raise ValueError(f"TP={n} does not fit {cfg.name}: {problem}. TP values that work for this model: {sizes}")


# ---------------------------------------------------------------------------------- sharding
def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def _rows(t: torch.Tensor, r: int, n: int, padded: int | None = None) -> torch.Tensor:
    """Rank r's contiguous slice of dim 0 (after zero-padding dim 0 to `padded`)."""
    t = _pad_rows(t, padded or t.shape[0])
    per = t.shape[0] // n
    return t[r * per:(r + 1) * per]


def _cols(t: torch.Tensor, r: int, n: int, padded: int | None = None) -> torch.Tensor:
    return _rows(t.t(), r, n, padded).t()


def _vision_shard(cfg: ModelConfig, name: str, t: torch.Tensor, r: int, n: int, tp: TPInfo) -> torch.Tensor:
    v = cfg.vision
    c, hd = v.hidden_size, v.head_dim
    heads_w = tp.padded(v.num_heads) * hd                     # padded attention width
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        return torch.cat([_rows(part, r, n, heads_w) for part in t.split(c, dim=0)])
    if name.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
        return _rows(t, r, n, heads_w)
    if name.endswith("attn.proj.weight"):
        return _cols(t, r, n, heads_w)
    if name.endswith(("mlp.fc1.weight", "mlp.fc1.bias")):
        return _rows(t, r, n, tp.padded(v.intermediate_size))
    if name.endswith("mlp.fc2.weight"):
        return _cols(t, r, n, tp.padded(v.intermediate_size))
    return t                                                  # norms, ls1/ls2, biases after a reduce, embeddings


def _llm_shard(cfg: ModelConfig, name: str, t: torch.Tensor, r: int, n: int, tp: TPInfo) -> torch.Tensor:
    llm = cfg.llm
    d = llm.head_dim
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return _rows(t, r, n, tp.padded(llm.vocab_size))
    if ".self_attn.q_proj." in name:
        return _rows(t, r, n)
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        if llm.num_kv_heads >= n:
            return _rows(t, r, n)
        kv_head = r // (n // llm.num_kv_heads)               # the KV head this rank's query heads share
        return t[kv_head * d:(kv_head + 1) * d]
    if name.endswith("self_attn.o_proj.weight"):
        return _cols(t, r, n)
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        return _rows(t, r, n, tp.padded(llm.intermediate_size))
    if name.endswith("mlp.down_proj.weight"):
        return _cols(t, r, n, tp.padded(llm.intermediate_size))
    return t                                                  # RMSNorm weights


def rank_shard(cfg: ModelConfig, weights: dict[str, torch.Tensor], r: int, n: int) -> dict[str, torch.Tensor]:
    """Rank r's weights out of the canonical ones (contiguous copies; replicated tensors shared)."""
    tp = TPInfo(r, n)
    shard: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name.startswith("vision_model."):
            s = _vision_shard(cfg, name, t, r, n, tp)
        elif name in ("mlp1.1.weight", "mlp1.1.bias"):
            s = _rows(t, r, n, tp.padded(cfg.llm.hidden_size))
        elif name == "mlp1.3.weight":
            s = _cols(t, r, n, tp.padded(cfg.llm.hidden_size))
        elif name.startswith("mlp1."):
            s = t                                              # LayerNorm, and mlp1.3's bias
        elif name.startswith("language_model."):
            s = _llm_shard(cfg, name, t, r, n, tp)
        else:
            raise KeyError(f"unexpected weight {name!r}: not a vision_model., mlp1. or language_model. name")
        shard[name] = s if s is t else s.contiguous()
    device = weights["language_model.embed_tokens.weight"].device
    per_vocab = tp.padded(cfg.llm.vocab_size) // n
    shard["language_model.embed_tokens.vocab_start"] = torch.tensor([r * per_vocab], dtype=torch.long, device=device)
    shard["language_model.lm_head.rank_slot"] = torch.tensor([r], dtype=torch.long, device=device)
    return shard


def shard_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Canonical weights -> one dict per rank, for build_model(cfg, shard, TPInfo(rank, n, group))."""
    check_tp(cfg, n)
    return [rank_shard(cfg, weights, r, n) for r in range(n)]


# ---------------------------------------------------------------------------------- compiling
@contextlib.contextmanager
def fake_process_group(n: int):
    """A process group of size n that performs nothing, for Inductor to resolve the group's name
    and size while compiling; yields that name (the default group's, as at run time)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("compiling a TP artifact needs a process without an initialized process group")
    dist.init_process_group("fake", rank=0, world_size=n, store=FakeStore())
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def program_signature(ep: ExportedProgram) -> list:
    """What the compiled code depends on: every node's op, target, arguments and value
    metadata, and the inputs' kinds and names (not the tensors' values)."""
    sig = [(s.kind.name, s.arg.name if hasattr(s.arg, "name") else None, s.target)
           for s in ep.graph_signature.input_specs]
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        meta = (tuple(val.shape), str(val.dtype), tuple(val.stride())) if isinstance(val, torch.Tensor) else repr(val)
        sig.append((node.op, str(node.target), repr(node.args), repr(node.kwargs), repr(meta)))
    return sig


def reuse_compiled(base: CompiledGraph, base_dir: Path, base_ep: ExportedProgram, ep: ExportedProgram,
                   out_dir: Path) -> CompiledGraph | None:
    """Rank 0's compiled graph for another rank's program, or None when the programs differ.

    Parameters and persistent buffers (the per-rank data) are bound by their state-dict name,
    so the constant map carries over; non-parameter constants (RoPE tables) must be equal."""
    if program_signature(ep) != program_signature(base_ep):
        return None
    if set(ep.constants) != set(base_ep.constants):
        return None
    for k, t in base_ep.constants.items():
        other = ep.constants[k]
        if isinstance(t, torch.Tensor) != isinstance(other, torch.Tensor):
            return None
        if isinstance(t, torch.Tensor) and (t.shape != other.shape or t.dtype != other.dtype or not torch.equal(t, other)):
            return None
    for fqn, key in base.constants.items():
        if key.startswith(EXTRA_WEIGHT_PREFIX) and fqn not in base_ep.constants:
            return None            # Inductor derived a constant from a parameter: compile this rank itself
        if not key.startswith(EXTRA_WEIGHT_PREFIX) and key not in ep.state_dict:
            return None
    bound = set(base.constants.values())
    for key, t in ep.state_dict.items():
        if key not in bound and not torch.equal(t, base_ep.state_dict[key]):
            return None            # a weight that differs between ranks is compiled into rank 0's code
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(base_dir) / base.package, Path(out_dir) / base.package)
    return CompiledGraph(name=base.name, package=base.package, constants=dict(base.constants),
                         extra_weights=base.extra_weights, compile_s=0.0, package_bytes=base.package_bytes)


_COLLECTIVE = re.compile(r"_c10d_functional_all_reduce_?\(")
# A collective applied to a buffer itself (not to a reinterpret_tensor view: a view is a tensor
# object of its own that only the collective ever holds).
_ON_BUFFER = re.compile(r"_c10d_functional_all_reduce_?\((buf\d+)\s*,")
_MOVE = re.compile(r"auto (buf\d+) = std::move\((buf\d+)\)")
_OUTPUT = re.compile(r"output_handles\[\d+\] = (buf\d+)\.release\(\)")


def check_outputs(package: Path) -> int:
    """Fail unless no graph output of `package` is a buffer an all-reduce used (see
    TP_COMPILE_OPTIONS); returns the number of all-reduces in the graph."""
    with zipfile.ZipFile(package) as z:
        names = [n for n in z.namelist() if n.endswith(".wrapper.cpp")]
        code = "\n".join(z.read(n).decode() for n in names)
    if not names:
        raise RuntimeError(f"{package}: no AOTInductor wrapper source to check")
    start = code.find("AOTInductorModel::run_impl(")
    body = code[start:] if start >= 0 else code
    touched = set(_ON_BUFFER.findall(body))
    for new, old in _MOVE.findall(body):           # buffer reuse, should it be on after all
        if old in touched:
            touched.add(new)
    aliased = touched & set(_OUTPUT.findall(body))
    if aliased:
        raise RuntimeError(f"{package}: graph output(s) {sorted(aliased)} are all-reduce buffers; a gloo worker "
                           "could deadlock on the GIL. Compile with TP_COMPILE_OPTIONS")
    return len(_COLLECTIVE.findall(body))


def count_collectives(ep: ExportedProgram) -> dict[str, int]:
    """Collective calls in an exported program, by op name."""
    counts: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and "_c10d_functional" in str(node.target) and "wait_tensor" not in str(node.target):
            name = str(node.target).split(".")[-2]
            counts[name] = counts.get(name, 0) + 1
    return counts
