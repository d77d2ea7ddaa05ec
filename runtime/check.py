"""Can this box run that artifact? Every reason it cannot, without loading any of its native code.

`internvl-artifact check X` / `internvl-run --artifact X --check` print one line per check and
exit 0 (it can run) or 1. X is an artifact directory or a bundle (read through, not unpacked).
Nothing here imports torch or opens a graph's shared library: the torch release is read from the
installed package's metadata, the CPU's flags from /proc/cpuinfo, a GPU's capability from
`nvidia-smi`.

`enforce_trust` is the load-time policy (runtime/artifact.py calls it before any shared library is
opened): with a trust store, refuse an unsigned artifact, a signer not in the store, a signature
that does not match the manifest, and files the manifest does not list; without one, say once
that the artifact is unverified.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from . import bundle as bundles
from .errors import ArtifactError
from .isa import cpu_flags, cpu_model, cpu_problem, missing_flags, targets_this_box_runs
from .signing import SIGNATURE, TrustStore, check_signature, trust_store

MANIFEST = "manifest.json"
QUIET_ENV = "INTERNVL_UNVERIFIED_NOTED"
FORMAT_VERSION = 1       # runtime/manifest.py's FORMAT_VERSION (that module imports torch)


@dataclass
class Finding:
    ok: bool
    what: str
    message: str
    signed: bool | None = None      # the signature finding: whether there is a signature at all

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.what:<10} {self.message}"


class UnverifiedArtifact(UserWarning):
    """Loaded without a trust store: nothing proved where the artifact came from."""


def _files_listed(manifest: dict) -> set[str]:
    return set(manifest.get("files", {})) | {MANIFEST, SIGNATURE}


def extra_files(artifact: Path, manifest: dict) -> list[str]:
    listed = _files_listed(manifest)
    return sorted(p.relative_to(artifact).as_posix() for p in artifact.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(artifact).as_posix() not in listed)


def enforce_trust(artifact: Path, manifest: dict, store: TrustStore | None) -> None:
    """Raise ArtifactError if the trust policy refuses the artifact directory (file hashes are the
    caller's: with a store they must be checked, whatever --skip-verify says)."""
    name = bundles.display_name(artifact)
    manifest_bytes = (artifact / MANIFEST).read_bytes()
    if json.loads(manifest_bytes) != manifest:
        raise ArtifactError(f"{name}: {MANIFEST} changed while it was being loaded: try again")
    sig = artifact / SIGNATURE
    result = check_signature(manifest_bytes, sig.read_bytes() if sig.is_file() else None, store, name)
    if not result.ok:
        raise ArtifactError(result.message)
    if store is None:
        if os.environ.get(QUIET_ENV):      # a tensor-parallel follower: rank 0 said it already
            return
        warnings.warn(f"note: {result.message}; set INTERNVL_TRUSTED_KEYS (or --trusted-keys) to a directory of "
                      "trusted signers' .pub files to verify artifacts", UnverifiedArtifact, stacklevel=3)
        return
    extra = extra_files(artifact, manifest)
    if extra:
        raise ArtifactError(f"{name} holds {len(extra)} file(s) its signed manifest does not list ({extra[0]}"
                            f"{', ...' if len(extra) > 1 else ''}): remove them or copy the artifact again")


def check(path: str | Path, trusted_keys: str | Path | None = None, check_hashes: bool = True) -> list[Finding]:
    path = Path(path)
    out: list[Finding] = []
    try:
        store = trust_store(trusted_keys)
    except ArtifactError as e:
        return [Finding(False, "trust", str(e))]
    # -- the files ----------------------------------------------------------------------------------
    if bundles.is_bundle(path):
        try:
            manifest_bytes, sig_bytes = bundles.scan(path)
        except ArtifactError as e:
            return [Finding(False, "bundle", str(e))]
        manifest = json.loads(manifest_bytes)
        out.append(Finding(True, "bundle", f"{path.stat().st_size / 1e6:.1f} MB, complete, its "
                                           f"{len(manifest.get('files', {}))} files match their sha256"))
    elif (path / MANIFEST).is_file():
        manifest_bytes = (path / MANIFEST).read_bytes()
        sig_bytes = (path / SIGNATURE).read_bytes() if (path / SIGNATURE).is_file() else None
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError as e:
            return [Finding(False, "manifest", f"{path / MANIFEST} is unreadable ({e}): re-compile or copy it again")]
        out += _check_dir_files(path, manifest, check_hashes, store)
    else:
        what = "does not exist" if not path.exists() else f"is neither a bundle nor an artifact directory ({MANIFEST} missing)"
        return [Finding(False, "artifact", f"{path} {what}")]
    # -- the manifest and this box -----------------------------------------------------------------------
    if manifest.get("format_version") != FORMAT_VERSION:
        out.append(Finding(False, "format", f"format version {manifest.get('format_version')}, this runtime reads "
                                            f"{FORMAT_VERSION}: re-compile the artifact with this version"))
    out.append(_check_torch(manifest.get("torch_version", "?")))
    out.append(_check_device(manifest.get("device", {})))
    # -- provenance ----------------------------------------------------------------------------------
    sig = check_signature(manifest_bytes, sig_bytes, store, str(path))
    out.append(Finding(sig.ok, "signature", sig.message, signed=sig.signed))
    return out


def _check_dir_files(path: Path, manifest: dict, check_hashes: bool, store) -> list[Finding]:
    files = manifest.get("files", {})
    missing = [rel for rel in files if not (path / rel).is_file()]
    out = [Finding(False, "files", f"{rel} is missing: copy the whole artifact again") for rel in missing]
    if check_hashes:
        bad = [rel for rel, d in files.items() if rel not in missing and bundles.sha256_file(path / rel) != d]
        out += [Finding(False, "files", f"{rel} does not match its sha256 in {MANIFEST} (altered or damaged): "
                                        "copy it again") for rel in bad]
    extra = extra_files(path, manifest)
    if extra and store is not None:
        out.append(Finding(False, "files", f"{len(extra)} file(s) not in the signed manifest ({', '.join(extra[:3])}"
                                           f"{', ...' if len(extra) > 3 else ''}): remove them"))
    if not out:
        out.append(Finding(True, "files", f"{len(files)} present" + (", sha256 match" if check_hashes else
                                                                     " (sha256 not checked)")))
    return out


def _check_torch(built: str) -> Finding:
    try:
        have = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return Finding(False, "torch", f"torch is not installed; the artifact needs torch=={built.split('+')[0]}")
    if have.split("+")[0] != built.split("+")[0]:
        return Finding(False, "torch", f"artifact was compiled with torch {built} but torch {have} is installed: "
                                       f"install torch=={built.split('+')[0]} or re-compile the artifact")
    return Finding(True, "torch", f"{have} (compiled with {built})")


def _check_device(dev: dict) -> Finding:
    if dev.get("kind") == "cuda":
        caps = _gpu_capabilities()
        if not caps:
            return Finding(False, "device", "artifact was compiled for CUDA but no CUDA device is visible "
                                            "(nvidia-smi): run it on a GPU or re-compile with BACKEND=cpu")
        if dev.get("capability") not in caps:
            return Finding(False, "device", f"artifact was compiled for CUDA capability {dev.get('capability')}, this "
                                            f"box's GPUs are {', '.join(caps)}: re-compile the artifact on this machine")
        return Finding(True, "device", f"CUDA capability {dev['capability']} present")
    have = cpu_flags()
    problem = cpu_problem(dev, have)
    if problem:
        return Finding(False, "cpu", problem)
    need = dev.get("isa", [])
    fits = targets_this_box_runs(have)
    return Finding(True, "cpu", f"target {dev.get('target', 'native')} needs {len(need)} flags "
                                f"({', '.join(need[-6:])}{', ...' if len(need) > 6 else ''}); this CPU "
                                f"({cpu_model()}, {platform.machine()}) has them"
                                + (f"; it runs targets {', '.join(fits)}" if fits else ""))


def _gpu_capabilities() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [c.strip() for c in p.stdout.splitlines() if c.strip()] if p.returncode == 0 else []


def report(path, trusted_keys=None, check_hashes=True, out=print) -> int:
    """Print the findings and a verdict; -> exit code 0 (runs here) or 1."""
    findings = check(path, trusted_keys, check_hashes)
    for f in findings:
        out(f.line())
    bad = [f for f in findings if not f.ok]
    if bad:
        out(f"NO: this box cannot run {path} ({len(bad)} problem{'s' if len(bad) > 1 else ''})")
        return 1
    out(f"OK: this box can run {path}")
    return 0


__all__ = ["Finding", "check", "report", "enforce_trust", "extra_files", "missing_flags", "UnverifiedArtifact"]
