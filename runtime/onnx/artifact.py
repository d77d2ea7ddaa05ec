"""Open a BACKEND=onnx artifact without torch: bundle, manifest, file hashes, trust, then the sessions.

The same checks as runtime/artifact.py's open_checked, in the same order, less the torch release
(the graphs are ONNX: any onnxruntime that knows their opset runs them) and the ISA flags
(onnxruntime picks its kernels on the box)."""
from __future__ import annotations

import json
import platform
from pathlib import Path

from ..bundle import freshly_verified, resolve_artifact, sha256_file
from ..check import enforce_trust
from ..errors import ArtifactError
from ..signing import trust_store

MANIFEST = "manifest.json"
ONNX_FORMAT = 1


def read_onnx_manifest(path: Path) -> dict:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise ArtifactError(f"{path} is not an artifact: {MANIFEST} is missing (compile one with `make compile`)")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{p} is unreadable ({e}); re-compile the artifact") from None


def is_onnx_artifact(path) -> bool:
    try:
        return read_onnx_manifest(resolve_artifact(path)).get("backend") == "onnx"
    except ArtifactError:
        return False


def verify_onnx(path: Path, manifest: dict, check_hashes: bool = True) -> None:
    if manifest.get("backend") != "onnx":
        raise ArtifactError(f"not a BACKEND=onnx artifact (backend {manifest.get('backend')!r})")
    fmt = manifest.get("onnx", {}).get("format")
    if fmt != ONNX_FORMAT:
        raise ArtifactError(f"ONNX artifact format {fmt}, this runtime reads {ONNX_FORMAT}: re-compile the artifact")
    dev = manifest.get("device", {})
    if dev.get("machine") and dev["machine"] != platform.machine():
        pass        # ONNX graphs carry no machine code: an x86 build runs on ARM
    files = manifest.get("files", {})
    for rel in files:
        if not (path / rel).is_file():
            raise ArtifactError(f"artifact file {rel} is missing: copy the whole artifact directory or re-compile")
    if check_hashes:
        for rel, digest in files.items():
            if sha256_file(path / rel) != digest:
                raise ArtifactError(f"artifact file {rel} does not match its sha256 in {MANIFEST} (corrupted or "
                                    "altered): copy it again or re-compile (--skip-verify skips this check)")


def open_onnx_artifact(path, skip_verify: bool = False, threads: int | None = None, trusted_keys=None):
    """-> (manifest, {graph name: OnnxGraph}, Tokenizer) of a directory or bundle."""
    from ..tokenizer import Tokenizer
    from .graphs import load_graphs
    path = resolve_artifact(path)
    fresh = freshly_verified(path)
    manifest = read_onnx_manifest(path)
    store = trust_store(trusted_keys)
    verify_onnx(path, manifest, check_hashes=(not skip_verify or store is not None) and not fresh)
    enforce_trust(path, manifest, store)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ArtifactError("this is a BACKEND=onnx artifact: install onnxruntime "
                            "(pip install 'internvl-aot[onnx-runtime]')") from None
    try:
        graphs = load_graphs(path, manifest, threads=threads)
    except (RuntimeError, KeyError, OSError) as e:
        raise ArtifactError(str(e)) from None
    return manifest, graphs, Tokenizer.from_dir(path / manifest["tokenizer_dir"])
