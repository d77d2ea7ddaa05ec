"""Open an artifact: check its manifest, map its weights once, bind every graph to them.

Before any shared library is opened: a bundle is unpacked (once, into the cache; runtime/bundle.py),
the manifest and files are verified, and the trust policy is applied (runtime/check.py's
enforce_trust: with a trust store, an unsigned, untrusted or altered artifact is refused)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .. import kernels
from .bundle import freshly_verified, resolve_artifact
from .check import QUIET_ENV, enforce_trust
from .graph_loader import GraphLoadError, load_graph, load_weights
from .manifest import ArtifactError, read_manifest, verify
from .signing import trust_store
from .tokenizer import Tokenizer


def open_checked(path: Path, skip_verify: bool = False, trusted_keys=None) -> tuple[Path, dict]:
    """-> (artifact directory, manifest) once `path` (a directory or a bundle) passed every check that
    needs no native code: bundle integrity, format, torch release, device, files, signature. With a
    trust store the file hashes are always checked (skip_verify is ignored)."""
    path = resolve_artifact(path)
    fresh = freshly_verified(path)      # unpacked from a bundle just now, every file checked on the way
    manifest = read_manifest(path)
    store = trust_store(trusted_keys)
    verify(path, manifest, check_hashes=(not skip_verify or store is not None) and not fresh)
    enforce_trust(path, manifest, store)
    return path, manifest


def load_artifact(path: Path, device: str | None = None, skip_verify: bool = False, rank: int = 0,
                  tokenizer: bool = True, checked: bool = False):
    """-> (manifest, {graph name: callable}, tokenizer (None when not asked for), device) of one rank.
    `path`: an artifact directory or a bundle. checked: open_checked() ran on it already."""
    if checked:
        path = Path(path)
        manifest = read_manifest(path)
    else:
        path, manifest = open_checked(path, skip_verify)
    backend = manifest["device"]["kind"]
    device = torch.device(device or ("cuda" if backend == "cuda" else "cpu"))
    if device.type != backend:
        raise ArtifactError(f"artifact was compiled for {backend}, not {device.type}: re-compile with BACKEND={device.type}")
    entry = manifest["ranks"][rank]
    try:
        kernels.load_for_artifact(path, manifest)      # before any package: its graphs may call the ops
        weights = load_weights(path / entry["weights"], device)
        graphs = {name: load_graph(path / g["package"], weights, g["constants"], device, check_inputs=False)
                  for name, g in entry["graphs"].items()}
    except (GraphLoadError, kernels.KernelError) as e:
        raise ArtifactError(str(e)) from None
    tok = Tokenizer.from_dir(path / manifest["tokenizer_dir"]) if tokenizer else None
    return manifest, graphs, tok, device


def open_tp_artifact(path: Path, device: str | None = None, skip_verify: bool = False, threads: int | None = None):
    """A tensor-parallel artifact: start the follower ranks (runtime/tp.py), load rank 0 here.

    -> (manifest, rank 0's graphs wrapped to drive the followers, tokenizer, device, RankGroup)."""
    from .tp import RankGroup, default_threads

    path, manifest = open_checked(path, skip_verify)      # every rank's files, once, here
    path = path.resolve()
    world = int(manifest["tp"])
    backend = manifest["device"]["kind"]
    device = torch.device(device or ("cuda" if backend == "cuda" else "cpu"))
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count < world:
            raise ArtifactError(f"this TP={world} artifact needs {world} GPUs, {count} visible: use a machine with "
                                f"{world} GPUs or compile with TP={max(1, count)}")
        device = torch.device("cuda", device.index or 0)
    else:
        threads = threads or default_threads(world)
        torch.set_num_threads(threads)

    def follower_argv(rank: int, addr: str, port: int) -> list[str]:
        argv = [sys.executable, "-m", "internvl_aot.runtime.tp_worker", "--artifact", str(path), "--rank", str(rank),
                "--master-addr", addr, "--master-port", str(port), "--parent-pid", str(os.getpid())]
        if device.type == "cuda":
            argv += ["--device", f"cuda:{(device.index + rank) % torch.cuda.device_count()}"]
        else:
            argv += ["--threads", str(threads)]
        return argv

    env = dict(os.environ)
    env[QUIET_ENV] = "1"        # the followers do not repeat rank 0's "unverified" note
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = str(threads)
    group = RankGroup(manifest, device)
    group.launch(follower_argv, env)
    try:
        _, graphs, tok, device = load_artifact(path, str(device), skip_verify=True, rank=0, checked=True)
        group.wait_loaded()
    except BaseException:
        group.stop()
        raise
    return manifest, group.wrap(graphs), tok, device, group
