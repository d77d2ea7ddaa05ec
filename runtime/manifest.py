"""The artifact's manifest: its schema, the device facts it records, and load-time verification.

compile/ writes manifests with these helpers and runtime/ checks them, so the format lives
in one place (artifacts/README.md documents it for people).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

try:
    import torch
except ImportError:         # only the ONNX runtime installed (runtime/onnx/): no torch on this box
    torch = None

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"     # Ed25519 signature over manifest.json's bytes (runtime/signing.py)
from .spec import DTYPES  # noqa: E402,F401  (the one dtype-name table; re-exported for compile/)
# CPU features that decide which kernels Inductor generates; an artifact built where one of
# these exists must not run where it is missing.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


from .errors import ArtifactError  # noqa: E402  (defined without torch for internvl-artifact check)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by posix relative path."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}


def cpu_isa() -> list[str]:
    """This CPU's flags among ISA_FLAGS (what a `native` artifact records and requires)."""
    from .isa import cpu_flags
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def device_info(backend: str, target: str = "native") -> dict:
    """The manifest's `device`. CPU: `isa` is every flag the graphs may use (the runtime requires
    them all): the build box's ISA_FLAGS for `native`, the target's flag list otherwise;
    `target`, `march`, `vec_isa` and `native_bf16` say what the code was built for, `built_on`
    the box that compiled it (runtime/isa.py)."""
    if backend == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return {"kind": "cuda", "name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}"}
    from .isa import cpu_model, get_target, native_target
    built_on = {"cpu": cpu_model(), "isa": cpu_isa()}
    t = native_target(built_on["isa"]) if target == "native" else get_target(target)
    vec_isa = t.vec_isa
    if target == "native":
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        vec_isa = str(pick_vec_isa())
    return {"kind": "cpu", "machine": platform.machine(), "isa": list(t.flags), "target": t.name,
            "march": t.march, "vec_isa": vec_isa, "native_bf16": t.native_bf16, "built_on": built_on}


def read_manifest(artifact: Path) -> dict:
    """The manifest of an artifact directory, or of a bundle (unpacked into the cache first, once:
    runtime/bundle.py)."""
    from .bundle import resolve_artifact
    artifact = resolve_artifact(artifact)
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{artifact} is not an artifact: {MANIFEST} is missing (compile one with `make compile`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is unreadable ({e}); re-compile the artifact") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')}, this runtime reads "
                            f"{FORMAT_VERSION}: re-compile the artifact with this version")
    return manifest


def verify(artifact: Path, manifest: dict, check_hashes: bool = True) -> None:
    """Refuse an artifact that was altered or built for another torch or device."""
    artifact = Path(artifact)
    built = manifest["torch_version"]
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ArtifactError(f"artifact was compiled with torch {built} but torch {torch.__version__} is installed: "
                            f"install torch=={built.split('+')[0]} or re-compile the artifact")
    dev = manifest["device"]
    if dev["kind"] == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError("artifact was compiled for CUDA but no CUDA device is available: "
                                "run it on a GPU or re-compile with BACKEND=cpu")
        here = "%d.%d" % torch.cuda.get_device_capability()
        if here != dev["capability"]:
            raise ArtifactError(f"artifact was compiled for CUDA capability {dev['capability']}, this GPU is "
                                f"{here}: re-compile the artifact on this machine")
    else:
        from .isa import cpu_problem
        problem = cpu_problem(dev)
        if problem:
            raise ArtifactError(problem)
    files = manifest.get("files", {})
    for rel in files:
        if not (artifact / rel).is_file():
            raise ArtifactError(f"artifact file {rel} is missing: copy the whole artifact directory or re-compile")
    if check_hashes:
        for rel, digest in files.items():
            if sha256_file(artifact / rel) != digest:
                raise ArtifactError(f"artifact file {rel} does not match its sha256 in {MANIFEST} (corrupted or "
                                    "altered): copy it again or re-compile (--skip-verify skips this check)")


def write_manifest(artifact: Path, manifest: dict) -> None:
    """Fill in the file hashes and write manifest.json atomically."""
    artifact = Path(artifact)
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=hash_tree(artifact))
    tmp = artifact / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, artifact / MANIFEST)
