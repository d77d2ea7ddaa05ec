"""BACKEND=npu: the Ascend NPU graph variant, exported per bucket through torchair (issue 21).

What it does, where the tools exist (none of it has been run on an NPU or with CANN by us):
1. refuses at once, before any weight is read, when torch_npu / torchair cannot be imported
   (`NpuUnavailable`, naming torch_npu, CANN and the versions that pair with the installed torch),
   and refuses DTYPE=bf16 for the models whose Ascend deployment is fp16 (`check_dtype`);
2. builds each rank's model, switches it to the NPU operators (graphs/npu_variant.py with
   `OpSet(torch.ops.npu, torch.ops.air)`: torch_npu's operators and torchair.ops' attention with
   tensor sequence lengths, the same schemas as the CPU stand-ins) and exports every bucket with
   `torchair.dynamo_export` (static shapes, dynamic=False: one `.air` per graph; torchair writes
   weights past 2 GB - 200 MB as external FileConstant files next to the .air by itself);
3. converts each `.air` with `atc --framework=1 ... --soc_version=<SoC>` when `atc` is on the PATH,
   otherwise writes the exact commands into the artifact (`atc_commands.sh`);
4. writes `npu_manifest.json`: torch, torch_npu and CANN versions, the SoC, the fixed KV-pool
   shape (static graphs fix the block count), and per graph its inputs (runtime/buckets.py
   graph_inputs + the two pools) and files. runtime/backends/npu.py refuses a mismatch.

torch_npu and torchair are imported only inside functions of this module; the rest of the
project never imports it unless BACKEND=npu.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from ...graphs.config import ModelConfig
from ...graphs.model import build_model
from ...graphs.npu_variant import to_npu_variant
from ...runtime.buckets import GraphKey, graph_inputs
from ...runtime.engine import Engine
from ...runtime.backends.npu import cann_version     # the box and the compiler read it alike
from ...runtime.manifest import DTYPES
from ...runtime.tokenizer import Tokenizer
from ..buckets import Buckets
from ..export import stage_module
from ..spec import build_spec

NPU_MANIFEST = "npu_manifest.json"
NPU_FORMAT = 1

# Models whose Ascend deployment runs in fp16 (BF16 is not supported there: the Atlas 300I DUO's
# Ascend 310P has no bf16). Registry names and the checkpoint directory / hub names they go by.
FP16_ONLY = ("internvl-chat-v1-5", "internvl2-2b", "internvl2-8b")

# What the torch_npu wheel says (shared/reference/npu-torchair.md §2): torch_npu X.Y.Z requires
# torch==X.Y.Z.*; 2.13.0 is built from the v2.13.0-26.2.0 branch (Ascend 26.2.0). Its README's CANN
# table stops at CANN 8.5.0 -> torch_npu 2.12.0rc1, so the CANN release for 2.13.0 is not stated.
ASCEND_RELEASE = {"2.13.0": "26.2.0"}
CANN_NOTE = {"2.13.0": "the CANN toolkit of the Ascend 26.2.0 release (the torch_npu README's CANN table "
                       "stops at CANN 8.5.0 -> torch_npu 2.12.0rc1; the exact CANN version for 2.13.0 is "
                       "not stated there)"}
GRAPH_LIMIT_BYTES = 2 * 1024 ** 3 - 200 * 1024 ** 2    # torchair keeps weights inside the .air up to this


class NpuUnavailable(RuntimeError):
    """BACKEND=npu cannot run here (torch_npu / torchair / CANN missing or mismatched)."""


def torch_base_version(v: str | None = None) -> str:
    return (v or torch.__version__).split("+")[0]


def pairing_text(torch_version: str | None = None) -> str:
    tv = torch_base_version(torch_version)
    cann = CANN_NOTE.get(tv, f"the CANN toolkit that the torch_npu {tv} release notes name")
    return (f"the installed torch {tv} pairs with torch_npu {tv} (its wheel requires torch=={tv}.*; torchair "
            f"ships inside torch_npu) and {cann}")


def unavailable_message(reason: str, torch_version: str | None = None) -> str:
    tv = torch_base_version(torch_version)
    return (f"BACKEND=npu needs torch_npu (with its torchair) and the Ascend CANN toolkit: {reason}. "
            f"{pairing_text(tv)[0].upper()}{pairing_text(tv)[1:]}: install them with `pip install "
            f"torch_npu=={tv}` on a machine with CANN, `source <CANN>/set_env.sh`, and set "
            f"TORCH_DEVICE_BACKEND_AUTOLOAD=0 where torch_npu is installed without CANN")


def import_torchair():
    """-> (torch_npu, torchair), or NpuUnavailable with the one-line reason."""
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")     # for any child process
    try:
        import torch_npu  # noqa: F401  (needs libascendcl/libhccl/libge_runner from CANN)
    except Exception as e:      # ImportError, or OSError/RuntimeError for missing CANN libraries
        raise NpuUnavailable(unavailable_message(f"`import torch_npu` failed ({type(e).__name__}: "
                                                 f"{str(e).splitlines()[0] if str(e) else 'no message'})")) from None
    npu_v = torch_base_version(getattr(torch_npu, "__version__", "unknown"))
    if npu_v != torch_base_version():
        raise NpuUnavailable(unavailable_message(f"torch_npu {npu_v} is installed, which does not pair with "
                                                 f"torch {torch_base_version()}"))
    try:
        import torchair
        import torchair.ops  # noqa: F401  (defines torch.ops.air.npu_fused_infer_attention_score)
    except Exception as e:
        raise NpuUnavailable(unavailable_message(f"`import torchair` failed ({type(e).__name__}: {e})")) from None
    return torch_npu, torchair


def _canonical_name(name: str) -> str:
    n = Path(name).name.lower().replace("_", "-")
    if n.endswith("-hf"):
        n = n[:-3]
    return n


def check_dtype(model_name: str, dtype: str) -> None:
    """BACKEND=npu with DTYPE=bf16 is refused for the fp16-only models, with the reason."""
    if dtype == "bf16" and _canonical_name(model_name) in FP16_ONLY:
        raise ValueError(f"BACKEND=npu with DTYPE=bf16 is refused for {model_name}: InternVL-Chat-V1-5, "
                         f"InternVL2-2B and InternVL2-8B run in fp16 on Ascend (BF16 is unsupported there: the "
                         f"Atlas 300I DUO's Ascend 310P has no bf16); compile with DTYPE=fp16")


def check_fia_dtype(dtype: str) -> None:
    """npu_fused_infer_attention_score takes float16 / bfloat16 queries only (torch_npu's API doc):
    an fp32 NPU graph would not run. (The CPU stand-ins take fp32: the tests compare in it.)"""
    if dtype == "fp32":
        raise ValueError("BACKEND=npu with DTYPE=fp32 is refused: the NPU attention (npu_fused_infer_attention_score) "
                         "takes float16 or bfloat16 only; compile with DTYPE=fp16 (or bf16)")


def resolve_soc(soc: str | None) -> str:
    """The target SoC (SOC=... or $NPU_SOC), refused in one line when missing or when the NPU attention
    is not documented for it: torch_npu lists npu_fused_infer_attention_score for Atlas A2 / A3 only,
    and torchair supports Atlas A2 / A3 / 950 (reference §1.1); the Atlas 300I DUO's Ascend 310P is
    neither (UNCONFIRMED that it fails there: never run by us)."""
    soc = soc or os.environ.get("NPU_SOC")
    if not soc:
        raise ValueError("BACKEND=npu needs the target SoC for atc --soc_version: SOC=Ascend910B3 "
                         "(Atlas 800I A2), SOC=Ascend910_9392 (Atlas A3), ... (or $NPU_SOC)")
    if soc.lower().startswith("ascend310") and os.environ.get("NPU_ALLOW_UNDOCUMENTED_SOC") != "1":
        # The original system lists the Atlas 300I DUO among its targets, so this is an opt-in, not a wall.
        raise ValueError(f"BACKEND=npu with SOC={soc} is refused: its attention (npu_fused_infer_attention_score) and "
                         f"torchair are documented for Atlas A2 / A3 (Ascend910B*, Ascend910_93*) only, not for "
                         f"Ascend 310 parts such as the Atlas 300I DUO's; set NPU_ALLOW_UNDOCUMENTED_SOC=1 to "
                         f"compile for it anyway (untested there)")
    return soc


FIA_BLOCK_SIZES = (128, 256, 384, 512)


def check_npu_buckets(buckets: Buckets) -> None:
    """torch_npu's API doc for npu_fused_infer_attention_score with a block_table: for more than one
    query per row (our prefill chunks) block_size is a multiple of 128 from 128 to 512; for one (decode)
    a multiple of 16, 128 recommended. One pool serves both, so 128..512 in steps of 128."""
    if buckets.block_size not in FIA_BLOCK_SIZES:
        raise ValueError(f"BACKEND=npu is refused with block_size={buckets.block_size}: the NPU's paged attention "
                         f"(npu_fused_infer_attention_score) takes a block size of 128, 256, 384 or 512 for prefill "
                         f"chunks; add block_size=128 to BUCKETS")


def check_npu_request(model_name: str, dtype: str, soc: str | None = None, buckets: Buckets | None = None) -> None:
    """Everything BACKEND=npu can refuse before any weight is read: the dtype, the toolchain, the
    buckets' block size, the SoC."""
    check_dtype(model_name, dtype)
    check_fia_dtype(dtype)
    import_torchair()
    if buckets is not None:
        check_npu_buckets(buckets)
    resolve_soc(soc)


def eager_npu_engine(cfg: ModelConfig, weights: dict, tokenizer_dir, buckets: Buckets | None = None,
                     dtype: str = "fp32", kv_cache_gb: float | None = None, ops=None) -> Engine:
    """compile/eager.py's eager_engine over the NPU graph variant (the CPU stand-ins by default):
    the runtime's padding, chunking and paged-cache code runs unchanged on it."""
    buckets = buckets or Buckets()
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    spec = build_spec(cfg, buckets, dtype, tokenizer)
    weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    model = to_npu_variant(build_model(cfg, weights, max_seq_len=buckets.max_context), ops)
    graphs = {name: stage_module(model, name) for name in buckets.graph_names()}
    return Engine(spec, graphs, tokenizer, "cpu", kv_cache_gb=kv_cache_gb)


# ------------------------------------------------------------------ the artifact

def default_num_blocks(buckets: Buckets) -> int:
    """Static graphs fix the pool: room for the largest decode batch at the largest context, + the sink."""
    return max(buckets.batch) * (buckets.max_context // buckets.block_size) + 1


def npu_inputs(model, buckets: Buckets, name: str, dtype: torch.dtype, num_blocks: int) -> list[dict]:
    """The graph's inputs in call order (what the .om takes and the ACL runner binds)."""
    cfg = model.cfg
    key = GraphKey.parse(name)
    rows = [{"name": n, "dtype": str(dt).replace("torch.", ""), "shape": list(s)}
            for n, dt, s in graph_inputs(key, hidden=cfg.llm.hidden_size, image_size=cfg.vision.image_size,
                                         block_size=buckets.block_size, dtype=dtype)]
    if key.stage != "vision":
        attn = model.language_model.layers[0].self_attn
        pool = [len(model.language_model.layers), num_blocks, buckets.block_size, attn.kv_heads, attn.head_dim]
        rows += [{"name": n, "dtype": str(dtype).replace("torch.", ""), "shape": pool, "kv_pool": True}
                 for n in ("k_cache", "v_cache")]
    return rows


def example_args(inputs: list[dict]) -> tuple:
    """CPU placeholder tensors of those shapes (dynamo_export's documented examples pass CPU tensors)."""
    out = []
    for row in inputs:
        dt = getattr(torch, row["dtype"])
        out.append(torch.arange(row["shape"][0]) if row["name"] == "positions" else torch.zeros(row["shape"], dtype=dt))
    return tuple(out)


@contextlib.contextmanager
def _rank_group(rank: int, world: int):
    """World size 1: nothing (yields ""). Otherwise a fake process group of `world` in which this
    process is `rank`, for the graphs' collectives and torchair's per-rank export; yields its name."""
    if world == 1:
        yield ""
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("compiling a TP artifact needs a process without an initialized process group")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def atc_command(air: str, om_stem: str, soc: str, external_weight: bool) -> list[str]:
    cmd = ["atc", "--framework=1", f"--model={air}", f"--output={om_stem}", f"--soc_version={soc}"]
    if external_weight:
        cmd.append("--external_weight=1")
    return cmd


def compile_npu(cfg: ModelConfig, weights: dict, tokenizer_dir: Path, out: Path, buckets: Buckets,
                dtype: str = "fp16", tp: int = 1, soc: str | None = None, num_blocks: int | None = None,
                source: dict | None = None, log: Callable[[str], None] = print, torchair=None,
                torch_npu=None, ops=None) -> dict:
    """Export every bucket of every rank to .air (+ .om where atc exists). `torchair`/`torch_npu`
    may be passed in (tests pass recording stand-ins); by default they are imported here."""
    check_dtype(cfg.name, dtype)
    if ops is None:                  # torch_npu's and torchair's operators (the stand-ins take any)
        check_fia_dtype(dtype)
        check_npu_buckets(buckets)
    soc = resolve_soc(soc)
    if torchair is None:
        torch_npu, torchair = import_torchair()
    from ..artifact import copy_tokenizer
    from ..tp import check_tp, rank_shard
    from ...graphs.parallel import SINGLE, TPInfo
    if tp > 1:
        check_tp(cfg, tp)
    t0 = time.perf_counter()
    tdtype = DTYPES[dtype]
    num_blocks = num_blocks or default_num_blocks(buckets)
    weights = {k: v.to(tdtype) if v.is_floating_point() else v for k, v in weights.items()}
    out = Path(out)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    atc = shutil.which("atc")
    names = buckets.graph_names()
    ranks, commands = [], []
    from ...graphs.npu_ops import OpSet
    # torch_npu's operators and torchair.ops' FIA (torch.ops.air exists once torchair is imported)
    npu_ops = ops if ops is not None else OpSet(torch.ops.npu, torch.ops.air)
    spec = None
    for r in range(tp):
        # One fake group per rank, with that rank: torchair names a TP export after
        # torch.distributed.get_rank() (<export_path>/rank_<r>/<name><r>.air) and writes
        # model_relation_config.json on rank 0 only.
        with _rank_group(r, tp) as group_name:
            if spec is None:
                spec = build_spec(cfg, buckets, dtype, Tokenizer.from_dir(tokenizer_dir), TPInfo(0, tp, group_name))
            tpi = TPInfo(r, tp, group_name) if tp > 1 else SINGLE
            model = build_model(cfg, weights if tp == 1 else rank_shard(cfg, weights, r, tp), tpi,
                                max_seq_len=buckets.max_context)
            to_npu_variant(model, npu_ops)
            wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
            graphs = {}
            for i, name in enumerate(names, 1):
                gdir, adir = Path(f"rank{r}") / name, Path("air") / name
                (staging / gdir).mkdir(parents=True)
                inputs = npu_inputs(model, buckets, name, tdtype, num_blocks)
                config = torchair.CompilerConfig()
                if tp > 1:
                    config.export.experimental.auto_atc_config_generated = True
                # A relative export path, from the artifact's root: the FileConstant weight files of
                # a graph past 2 GB are then named relative to it (an absolute path would name the
                # staging directory, which is renamed), and atc runs from there (reference §1.6).
                # Every rank of a graph exports into one folder, as torchair lays a TP export out:
                # air/<name>/<name><r>.air, rank_<r>/ (its weights), model_relation_config.json.
                with torch.no_grad(), _cwd(staging):
                    torchair.dynamo_export(*example_args(inputs), model=stage_module(model, name),
                                           export_path=str(adir), export_name=name, dynamic=False,
                                           config=config)
                air = adir / (f"{name}{r}.air" if tp > 1 else f"{name}.air")
                if not (staging / air).is_file():
                    raise RuntimeError(f"torchair.dynamo_export did not write {air} (found: "
                                       f"{sorted(str(a.relative_to(staging)) for a in (staging / adir).rglob('*.air'))})")
                om_stem = str(gdir / name)
                cmd = atc_command(str(air), om_stem, soc, wbytes > GRAPH_LIMIT_BYTES)
                commands.append(cmd)
                om = None
                if atc:
                    log(f"[atc rank {r} {i}/{len(names)}] {shlex.join(cmd)}")
                    subprocess.run(cmd, cwd=staging, check=True)
                    om = om_stem + ".om"
                graphs[name] = {"air": str(air), "om": om, "inputs": inputs}
                log(f"[npu export rank {r} {i}/{len(names)}] {name}: {air} ({time.perf_counter() - t0:.0f} s)")
            ranks.append({"graphs": graphs})
    script = staging / "atc_commands.sh"
    tp_note = ("" if tp == 1 else
               "# TP>1: the graphs hold HcomAllReduce; torchair wrote model_relation_config.json and numa_config.json\n"
               "# (templates to edit: ATC's --model_relation_config / --cluster_config) next to each graph's .air files.\n"
               "# UNCONFIRMED (never run by us) whether one atc per rank, as below, is what HCCL needs.\n")
    script.write_text("#!/bin/sh\n# Run from this directory on a machine with the CANN toolkit "
                      "(`source <CANN>/set_env.sh` first): .air -> .om, one per graph.\n" + tp_note + "set -e\n"
                      + "".join(shlex.join(c) + "\n" for c in commands))
    script.chmod(0o755)
    copy_tokenizer(Path(tokenizer_dir), staging / "tokenizer")
    manifest = dict(spec)
    manifest.update({
        "backend": "npu", "npu_format": NPU_FORMAT, "source": source or {},
        "versions": {"torch": torch_base_version(), "torch_npu": torch_base_version(
            getattr(torch_npu, "__version__", None) or "unknown"), "cann": cann_version()},
        "soc": soc, "kv_pool": {"num_blocks": num_blocks, "block_size": buckets.block_size},
        "om_built": bool(atc), "atc_commands": "atc_commands.sh",
        "tokenizer_dir": "tokenizer", "graphs": sorted(names), "ranks": ranks,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware_tested": False,
    })
    (staging / NPU_MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    log(f"[done] {out}: {len(names)} graphs x {tp} rank(s), .om {'built' if atc else 'not built: atc is not on the PATH, commands in atc_commands.sh'}")
    return manifest
