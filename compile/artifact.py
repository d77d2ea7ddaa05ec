"""Writes an artifact directory (format: artifacts/README.md).

The directory is built next to its destination and renamed into place at the end, so an
interrupted compile never leaves a half-written artifact where a runtime could load it.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..runtime import weights_file
from ..runtime.manifest import device_info, write_manifest
from .aoti import CompiledGraph

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copy2(src / f, dst / f)
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {src} (looked for {', '.join(TOKENIZER_FILES[:3])}, ...)")
    return copied


def collect_weights(programs: dict, compiled: dict[str, CompiledGraph]) -> dict[str, torch.Tensor]:
    """Every tensor any graph binds, once, under the key the manifest names."""
    out: dict[str, torch.Tensor] = {}
    for name, graph in compiled.items():
        ep = programs[name]
        tables = (ep.state_dict, ep.constants, graph.extra_weights)
        for key in graph.constants.values():
            t = next((tab[key] for tab in tables if key in tab), None)
            if t is None:
                raise KeyError(f"graph {name} binds {key!r}, which no program or pass produced")
            prev = out.get(key)
            if prev is not None and (prev.shape != t.shape or prev.dtype != t.dtype):
                raise ValueError(f"weight {key!r} differs between graphs: {prev.shape} vs {t.shape}")
            out.setdefault(key, t)
    return {k: v.detach().contiguous() for k, v in out.items()}


def write_artifact(out: Path, staging: Path, spec: dict, ranks: list[dict], tokenizer_src: Path,
                   source: dict, backend: str, compile_info: dict, target: str = "native") -> Path:
    """staging already holds rank<i>/graphs/*.pt2; ranks[i] = {"weights": dict, "graphs": {name: CompiledGraph}}."""
    copy_tokenizer(tokenizer_src, staging / "tokenizer")
    rank_entries = []
    for i, r in enumerate(ranks):
        wrel = f"rank{i}/weights.safetensors"
        weights_file.write(r["weights"], staging / wrel, metadata={"format": "pt"})
        rank_entries.append({"weights": wrel, "graphs": {
            n: {"package": f"rank{i}/graphs/{g.package}", "constants": g.constants} for n, g in r["graphs"].items()}})
    manifest = dict(spec)
    manifest.update({
        "source": source, "backend": backend, "device": device_info(backend, target),
        "torch_version": torch.__version__, "tokenizer_dir": "tokenizer", "ranks": rank_entries,
        "graphs": sorted(ranks[0]["graphs"]), "compile": compile_info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    write_manifest(staging, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
