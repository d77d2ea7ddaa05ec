"""Open an artifact: check its manifest, map its weights once, bind every graph to them."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .graph_loader import GraphLoadError, load_graph, load_weights
from .manifest import ArtifactError, read_manifest, verify
from .tokenizer import Tokenizer


def load_artifact(path: Path, device: str | None = None, skip_verify: bool = False, rank: int = 0,
                  log=None):
    """-> (manifest, {graph name: callable}, tokenizer, device)."""
    path = Path(path)
    t0 = time.perf_counter()
    manifest = read_manifest(path)
    verify(path, manifest, check_hashes=not skip_verify)
    backend = manifest["device"]["kind"]
    device = torch.device(device or ("cuda" if backend == "cuda" else "cpu"))
    if device.type != backend:
        raise ArtifactError(f"artifact was compiled for {backend}, not {device.type}: re-compile with BACKEND={device.type}")
    entry = manifest["ranks"][rank]
    try:
        weights = load_weights(path / entry["weights"], device)
        graphs = {name: load_graph(path / g["package"], weights, g["constants"], device, check_inputs=False)
                  for name, g in entry["graphs"].items()}
    except GraphLoadError as e:
        raise ArtifactError(str(e)) from None
    tokenizer = Tokenizer.from_dir(path / manifest["tokenizer_dir"])
    if log:
        log(f"loaded {path.name}: {len(graphs)} graphs, {sum(t.numel() * t.element_size() for t in weights.values()) / 1e9:.2f} GB "
            f"weights in {time.perf_counter() - t0:.1f} s")
    return manifest, graphs, tokenizer, device
