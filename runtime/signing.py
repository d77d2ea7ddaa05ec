"""Ed25519 signatures of artifacts, and the trust store that decides which signers a box accepts.

A signature covers `manifest.json`'s exact bytes; the manifest holds the sha256 of every other
file, so a valid signature plus matching file hashes proves that every byte of the artifact is
what the signer compiled. It is written next to the manifest as `manifest.sig` (JSON: the
signer's key id and public key, the manifest's sha256, the signature, all base64/hex), and
travels inside bundles as their second member.

Keys: `internvl-artifact keygen -o NAME` writes `NAME.key` (PKCS#8 PEM, mode 0600: keep it on the
build server) and `NAME.pub` (SubjectPublicKeyInfo PEM). A trust store is a directory of `*.pub`
files (`--trusted-keys DIR` or `$INTERNVL_TRUSTED_KEYS`). A key's id is the first 16 hex digits of
the sha256 of its 32 raw public-key bytes.

No torch here: internvl-artifact check/verify run it without loading native model code.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError

SIGNATURE = "manifest.sig"
SIG_FORMAT = 1
# The signed message is this prefix + the manifest's bytes, so an artifact signature can never be
# replayed as a signature of something else made with the same key.
DOMAIN = b"internvl-aot artifact manifest v1\n"
TRUST_ENV = "INTERNVL_TRUSTED_KEYS"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ArtifactError("signatures need the `cryptography` package: pip install cryptography") from None
    return serialization, ed25519


def _raw_public(pub) -> bytes:
    serialization, _ = _crypto()
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub) -> str:
    return hashlib.sha256(_raw_public(pub)).hexdigest()[:16]


def generate_key(prefix: str | os.PathLike) -> tuple[Path, Path, str]:
    """Write PREFIX.key and PREFIX.pub; -> (key path, pub path, key id). Refuses to overwrite."""
    serialization, ed25519 = _crypto()
    prefix = Path(prefix)
    key_path, pub_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise ArtifactError(f"{p} exists already: choose another name (-o) or delete it first")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key()
    pub_path.write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path, key_id(pub)


def load_private_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"cannot read signing key {path}: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ArtifactError(f"{path} is not an Ed25519 private key (make one with `internvl-artifact keygen`)")
    return key


def load_public_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    try:
        pub = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"cannot read public key {path}: {e}") from None
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise ArtifactError(f"{path} is not an Ed25519 public key")
    return pub


def sign_manifest(manifest_bytes: bytes, key) -> bytes:
    """-> the bytes of manifest.sig for this manifest."""
    pub = key.public_key()
    sig = key.sign(DOMAIN + manifest_bytes)
    return (json.dumps({
        "format": SIG_FORMAT, "algorithm": "ed25519", "key_id": key_id(pub),
        "public_key": base64.b64encode(_raw_public(pub)).decode(),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": base64.b64encode(sig).decode(),
    }, indent=2) + "\n").encode()


@dataclass
class TrustStore:
    path: Path
    keys: dict   # key id -> Ed25519PublicKey

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrustStore":
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"trust store {path} is not a directory (it holds the signers' *.pub files)")
        keys = {}
        for p in sorted(path.glob("*.pub")):
            pub = load_public_key(p)
            keys[key_id(pub)] = pub
        return cls(path, keys)


def trust_store(explicit: str | os.PathLike | None = None) -> TrustStore | None:
    """The trust store given, else $INTERNVL_TRUSTED_KEYS, else None (no verification)."""
    where = explicit or os.environ.get(TRUST_ENV)
    return TrustStore.load(where) if where else None


@dataclass
class SignatureCheck:
    ok: bool            # acceptable under the policy (always True without a trust store unless damaged)
    signed: bool
    key_id: str | None
    message: str        # one line


def check_signature(manifest_bytes: bytes, sig_bytes: bytes | None, store: TrustStore | None,
                    name: str = "artifact") -> SignatureCheck:
    """Judge `manifest.sig` against the manifest and the trust store (None: no store, nothing is
    refused, but a signature that is present must still match its own embedded key)."""
    if sig_bytes is None:
        if store is None:
            return SignatureCheck(True, False, None, f"{name} is unsigned and unverified (no trust store given)")
        return SignatureCheck(False, False, None,
                              f"{name} is not signed, and the trust store {store.path} requires a signature: "
                              f"sign it with `internvl-artifact sign --key KEY {name}` on the build server")
    _, ed25519 = _crypto()
    try:
        sig = json.loads(sig_bytes)
        kid = sig["key_id"]
        embedded = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(sig["public_key"]))
        raw_sig = base64.b64decode(sig["signature"])
        if sig.get("format") != SIG_FORMAT or sig.get("algorithm") != "ed25519":
            raise ValueError("unknown signature format")
    except (ValueError, KeyError, TypeError) as e:
        return SignatureCheck(False, True, None, f"{name}'s {SIGNATURE} is unreadable ({e}): sign the artifact again")
    if store is not None:
        pub = store.keys.get(kid)
        if pub is None:
            return SignatureCheck(False, True, kid,
                                  f"{name} is signed by key {kid}, which is not in the trust store {store.path}: "
                                  f"add the signer's .pub file there, or re-sign with a trusted key")
    else:
        pub = embedded
    try:
        pub.verify(raw_sig, DOMAIN + manifest_bytes)
    except Exception:   # cryptography's InvalidSignature
        return SignatureCheck(False, True, kid,
                              f"{name}'s signature (key {kid}) does not match its manifest.json: the manifest was "
                              f"changed after signing, or the signature belongs to another artifact; copy the "
                              f"artifact again or re-sign it")
    if store is None:
        return SignatureCheck(True, True, kid, f"{name} is signed by key {kid} but unverified (no trust store given)")
    return SignatureCheck(True, True, kid, f"{name} is signed by trusted key {kid} ({store.path})")
