"""One-file bundles (`.ivl`): an artifact directory as a single file to copy to an edge box.

Format: an uncompressed POSIX tar (ustar), readable by `tar -xf`, whose first member is
`manifest.json`, whose second is `manifest.sig` when the artifact is signed, and whose other
members are exactly the manifest's `files`, in its order; regular files only, relative paths, no
links, owner 0 and mtime 0 (packing the same artifact twice gives the same bytes). Uncompressed
because the weights and the shared libraries barely compress, and so a reader can check the
manifest before it reads anything else.

Running a bundle (`internvl-run --artifact model.ivl`, `Engine.from_artifact("model.ivl")`):
`resolve_artifact` unpacks it once into a cache directory named by the bundle's sha256
(`$INTERNVL_CACHE_DIR`, default `~/.cache/internvl-aot/bundles/<sha256[:32]>`). Unpacking checks
every member against the manifest's sha256 as it writes it, into a private temporary directory
renamed into place only when complete, under an exclusive lock: a second process starting at the
same time waits and then uses the finished directory; a truncated or altered bundle is refused
with a one-line reason before anything is loaded. A small index (path, size, mtime, inode ->
sha256) saves hashing an unchanged bundle again at the next start; the unpacked directory is
then verified at load like any artifact directory.

No torch here (internvl-artifact check reads bundles without loading native code).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ArtifactError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SUFFIX = ".ivl"
CACHE_ENV = "INTERNVL_CACHE_DIR"
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def is_bundle(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(512)
    return len(head) == 512 and head[257:262] == b"ustar"


def _safe_name(name: str) -> bool:
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


# -- pack ---------------------------------------------------------------------------------------------
def pack(artifact: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the artifact directory as one bundle file (atomically); every file is checked against
    its manifest sha256 on the way in. -> {"bytes", "files", "sha256", "signed"}."""
    artifact, out = Path(artifact), Path(out)
    mpath = artifact / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{artifact} is not an artifact directory: {MANIFEST} is missing")
    manifest_bytes = mpath.read_bytes()
    files = json.loads(manifest_bytes).get("files", {})
    sig = artifact / SIGNATURE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                _add_bytes(tar, MANIFEST, manifest_bytes)
                if sig.is_file():
                    _add_bytes(tar, SIGNATURE, sig.read_bytes())
                for rel, digest in files.items():
                    src = artifact / rel
                    if not src.is_file():
                        raise ArtifactError(f"cannot pack {artifact}: {rel} is missing")
                    info = _info(rel, src.stat().st_size)
                    with open(src, "rb") as f:
                        check = _HashingReader(f)
                        tar.addfile(info, check)
                    if check.hexdigest() != digest:
                        raise ArtifactError(f"cannot pack {artifact}: {rel} does not match its sha256 in {MANIFEST} "
                                            "(altered or damaged): re-compile it")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"bytes": out.stat().st_size, "files": len(files), "sha256": sha256_file(out), "signed": sig.is_file()}


def replace_signature(bundle: str | os.PathLike, sig_bytes: bytes) -> None:
    """Rewrite a bundle with `sig_bytes` as its manifest.sig (atomically; the caller checked it)."""
    bundle = Path(bundle)
    tmp = bundle.with_name(f".{bundle.name}.{os.getpid()}.partial")
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as out:
            for i, (name, f, _, m) in enumerate(iter_members(bundle)):
                if name == SIGNATURE:
                    continue
                if i == 0:
                    out.addfile(_info(name, m.size), f)
                    _add_bytes(out, SIGNATURE, sig_bytes)
                else:
                    out.addfile(_info(name, m.size), f)
        os.replace(tmp, bundle)
    finally:
        tmp.unlink(missing_ok=True)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, 0o644, 0, 0, 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, len(data)), io.BytesIO(data))


class _HashingReader:
    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n=-1):
        b = self.f.read(n)
        self.h.update(b)
        return b

    def hexdigest(self):
        return self.h.hexdigest()


# -- read ---------------------------------------------------------------------------------------------
def iter_members(bundle: Path) -> Iterator[tuple[str, object, tarfile.TarFile, tarfile.TarInfo]]:
    """Yield (name, file object, tar, member) for every member in order, refusing anything that is not
    a plain file with a safe relative name."""
    with tarfile.open(bundle, mode="r:") as tar:
        for m in tar:
            if not m.isreg() or not _safe_name(m.name):
                raise ArtifactError(f"bundle {bundle} holds {m.name!r}, which is not a plain file with a relative "
                                    "path: refusing it (pack bundles with `internvl-artifact pack`)")
            yield m.name, tar.extractfile(m), tar, m


def scan(bundle: str | os.PathLike, dest: Path | None = None) -> tuple[bytes, bytes | None]:
    """Read a bundle through, checking that it is complete and that every member matches the
    manifest's sha256; with `dest`, write the members there. -> (manifest bytes, signature bytes)."""
    bundle = Path(bundle)
    try:
        return _scan(bundle, dest)
    except (tarfile.TarError, EOFError) as e:
        raise ArtifactError(f"bundle {bundle} is truncated or damaged ({e}): copy it again") from None


def _scan(bundle: Path, dest: Path | None) -> tuple[bytes, bytes | None]:
    manifest_bytes = sig_bytes = None
    files: dict[str, str] = {}
    seen: set[str] = set()
    for i, (name, f, tar, m) in enumerate(iter_members(bundle)):
        if i == 0:
            if name != MANIFEST:
                raise ArtifactError(f"{bundle} is not an artifact bundle: its first member is {name!r}, not {MANIFEST}")
            manifest_bytes = f.read()
            try:
                files = json.loads(manifest_bytes).get("files", {})
            except ValueError as e:
                raise ArtifactError(f"bundle {bundle}: {MANIFEST} is unreadable ({e}): copy it again") from None
            data = manifest_bytes
        elif name == SIGNATURE and i == 1:
            sig_bytes = data = f.read()
        else:
            data = None
            if name not in files:
                raise ArtifactError(f"bundle {bundle} holds {name}, which its manifest does not list (altered): "
                                    "copy it again")
            if name in seen:
                raise ArtifactError(f"bundle {bundle} holds {name} twice (altered): copy it again")
        seen.add(name)
        if dest is not None:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if data is not None:
                target.write_bytes(data)
            else:
                h = hashlib.sha256()
                with open(target, "wb") as out:
                    while block := f.read(_CHUNK):
                        h.update(block)
                        out.write(block)
                _check_digest(bundle, name, h.hexdigest(), files[name])
        elif data is None:
            h = hashlib.sha256()
            while block := f.read(_CHUNK):
                h.update(block)
            _check_digest(bundle, name, h.hexdigest(), files[name])
    if manifest_bytes is None:
        raise ArtifactError(f"bundle {bundle} is empty: copy it again")
    missing = [rel for rel in files if rel not in seen]
    if missing:
        raise ArtifactError(f"bundle {bundle} is truncated: {len(missing)} of its files are missing "
                            f"({missing[0]}{', ...' if len(missing) > 1 else ''}): copy it again")
    return manifest_bytes, sig_bytes


def _check_digest(bundle: Path, name: str, got: str, want: str) -> None:
    if got != want:
        raise ArtifactError(f"bundle {bundle}: {name} does not match its sha256 in {MANIFEST} (altered or damaged): "
                            "copy it again")


def unpack(bundle: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack into the directory `dest` (which must not exist), atomically."""
    bundle, dest = Path(bundle), Path(dest)
    if dest.exists():
        raise ArtifactError(f"{dest} exists already: unpack into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        scan(bundle, tmp)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- cache ----------------------------------------------------------------------------------------------
def default_cache_base() -> Path:
    """$XDG_CACHE_HOME/internvl-aot (~/.cache/internvl-aot): bundles/ here, kernels/ (kernels/__init__.py)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "internvl-aot"


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base)
    return default_cache_base() / "bundles"


def bundle_sha256(bundle: Path, root: Path) -> str:
    """The bundle's sha256, remembered per (path, size, mtime, inode) in root/index/."""
    st = bundle.stat()
    stamp = {"path": str(bundle.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    index = root / "index" / (hashlib.sha256(stamp["path"].encode()).hexdigest()[:32] + ".json")
    with contextlib.suppress(OSError, ValueError):
        memo = json.loads(index.read_text())
        if {k: memo.get(k) for k in stamp} == stamp and len(memo.get("sha256", "")) == 64:
            return memo["sha256"]
    digest = sha256_file(bundle)
    with contextlib.suppress(OSError):
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{index.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "sha256": digest}))
        os.replace(tmp, index)
    return digest


_origin: dict[str, str] = {}      # unpacked cache dir -> the bundle it came from (for messages)
_fresh: set[str] = set()           # dirs this process unpacked, checking every file, moments ago


def freshly_verified(path: str | os.PathLike) -> bool:
    """True once for a directory this process just unpacked (every member was checked against the
    manifest's sha256 as it was written): the load need not hash the files a second time."""
    key = str(Path(path))
    if key in _fresh:
        _fresh.discard(key)
        return True
    return False


def display_name(path: str | os.PathLike) -> str:
    return _origin.get(str(Path(path)), str(path))


def resolve_artifact(path: str | os.PathLike) -> Path:
    """An artifact directory as is; a bundle -> its unpacked directory in the cache (unpacked and
    checked on first use)."""
    path = Path(path)
    if path.is_dir() or not is_bundle(path):
        return path
    root = cache_root()
    digest = bundle_sha256(path, root)
    final = root / digest[:32]
    _origin[str(final)] = str(path)
    if (final / MANIFEST).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{digest[:32]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # a second process waits here, then finds `final`
        if (final / MANIFEST).is_file():
            return final
        if final.exists():                     # never complete (a crash between rename steps cannot leave one)
            shutil.rmtree(final)
        unpack(path, final)
        _fresh.add(str(final))
    return final
