"""internvl-artifact: ship artifacts to edge boxes (one-file bundles, signatures, checks).

    internvl-artifact keygen -o keys/build-server            # keys/build-server.key (secret), .pub (share)
    internvl-artifact sign --key keys/build-server.key artifacts/demo-v3      # or a bundle
    internvl-artifact pack artifacts/demo-v3 -o demo-v3.ivl
    internvl-artifact verify --trusted-keys /etc/internvl/trusted demo-v3.ivl
    internvl-artifact check demo-v3.ivl                      # can this box run it? exit 0 or 1
    internvl-artifact unpack demo-v3.ivl -o /opt/models/demo-v3
    internvl-artifact targets                                # the compile targets, and which this box runs

None of these loads an artifact's native code (nor torch).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import bundle as bundles
from .errors import ArtifactError


def _cmd_check(args) -> int:
    from .check import report
    return report(args.artifact, args.trusted_keys, check_hashes=not args.skip_verify)


def _cmd_pack(args) -> int:
    src = Path(args.artifact)
    out = Path(args.out or (src.name + bundles.SUFFIX))
    info = bundles.pack(src, out)
    print(f"packed {src} -> {out}: {info['files']} files, {info['bytes'] / 1e6:.1f} MB, "
          f"{'signed' if info['signed'] else 'unsigned'}, sha256 {info['sha256']}")
    return 0


def _cmd_unpack(args) -> int:
    src = Path(args.bundle)
    if not bundles.is_bundle(src):
        raise ArtifactError(f"{src} is not a bundle (an uncompressed tar from `internvl-artifact pack`)")
    out = Path(args.out or src.name.removesuffix(bundles.SUFFIX))
    bundles.unpack(src, out)
    print(f"unpacked {src} -> {out}")
    return 0


def _cmd_keygen(args) -> int:
    from .signing import generate_key
    key, pub, kid = generate_key(args.out)
    print(f"key {kid}: secret key {key} (keep it on the build server), public key {pub} "
          f"(copy it into the edge boxes' trust store)")
    return 0


def _cmd_sign(args) -> int:
    from .signing import SIGNATURE, key_id, load_private_key, sign_manifest
    key = load_private_key(args.key)
    target = Path(args.artifact)
    if bundles.is_bundle(target):
        manifest_bytes, _ = bundles.scan(target)           # refuses a damaged bundle
        sig = sign_manifest(manifest_bytes, key)
        bundles.replace_signature(target, sig)
    elif (target / bundles.MANIFEST).is_file():
        from .check import _check_dir_files
        bad = [f for f in _check_dir_files(target, json.loads((target / bundles.MANIFEST).read_bytes()), True, None)
               if not f.ok]
        if bad:
            raise ArtifactError(f"refusing to sign {target}: {bad[0].message}")
        sig = sign_manifest((target / bundles.MANIFEST).read_bytes(), key)
        tmp = target / (SIGNATURE + ".tmp")
        tmp.write_bytes(sig)
        os.replace(tmp, target / SIGNATURE)
    else:
        raise ArtifactError(f"{target} is neither an artifact directory nor a bundle")
    print(f"signed {target} with key {key_id(key.public_key())}")
    return 0


def _cmd_verify(args) -> int:
    from .check import Finding, check
    findings = [f for f in check(args.artifact, args.trusted_keys, check_hashes=True)
                if f.what in ("artifact", "bundle", "manifest", "files", "trust", "signature")]
    findings = [Finding(False, "signature", f"{args.artifact} is not signed: nothing to verify (sign it with "
                                            "`internvl-artifact sign --key KEY` on the build server)")
                if f.what == "signature" and f.signed is False else f for f in findings]
    for f in findings:
        print(f.line())
    if all(f.ok for f in findings):
        store = args.trusted_keys or os.environ.get("INTERNVL_TRUSTED_KEYS")
        print(f"OK: {args.artifact} is intact" + (" and signed by a trusted key" if store else
                                                  "; its signer is not checked (no trust store given)"))
        return 0
    print(f"NO: {args.artifact} failed verification")
    return 1


def _cmd_targets(args) -> int:
    from .isa import TARGETS, cpu_flags, cpu_model, missing_flags
    have = cpu_flags()
    print(f"this CPU: {cpu_model()}")
    print(f"  {'native':<16} -march=native                 this box's own ISA (an artifact that runs only on its kind)")
    for t in TARGETS.values():
        miss = missing_flags(t.flags, have)
        runs = "runs here" if not miss else f"does not run here (lacks {', '.join(miss)})"
        print(f"  {t.name:<16} -march={t.march:<12} {t.vec_isa:<6} native bf16: {'yes' if t.native_bf16 else 'no ':<3}  "
              f"{t.description}; {runs}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="internvl-artifact", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    trust_help = "directory of trusted signers' *.pub files (default: $INTERNVL_TRUSTED_KEYS)"
    p = sub.add_parser("check", help="can this box run the artifact? every reason it cannot; exit 0 or 1")
    p.add_argument("artifact")
    p.add_argument("--trusted-keys", default=None, metavar="DIR", help=trust_help)
    p.add_argument("--skip-verify", action="store_true", help="do not hash the files (directories only)")
    p.set_defaults(fn=_cmd_check)
    p = sub.add_parser("pack", help="artifact directory -> one bundle file")
    p.add_argument("artifact")
    p.add_argument("-o", "--out", default=None, help="bundle file (default: <dir name>.ivl)")
    p.set_defaults(fn=_cmd_pack)
    p = sub.add_parser("unpack", help="bundle -> artifact directory")
    p.add_argument("bundle")
    p.add_argument("-o", "--out", default=None, help="new directory (default: the bundle's name without .ivl)")
    p.set_defaults(fn=_cmd_unpack)
    p = sub.add_parser("keygen", help="make an Ed25519 signing key pair")
    p.add_argument("-o", "--out", required=True, help="path prefix: writes PREFIX.key and PREFIX.pub")
    p.set_defaults(fn=_cmd_keygen)
    p = sub.add_parser("sign", help="sign an artifact directory or a bundle (writes manifest.sig)")
    p.add_argument("--key", required=True, help="the .key file from keygen")
    p.add_argument("artifact")
    p.set_defaults(fn=_cmd_sign)
    p = sub.add_parser("verify", help="check the files and the signature (against a trust store if given)")
    p.add_argument("artifact")
    p.add_argument("--trusted-keys", default=None, metavar="DIR", help=trust_help)
    p.set_defaults(fn=_cmd_verify)
    p = sub.add_parser("targets", help="list the compile targets and which of them this box runs")
    p.set_defaults(fn=_cmd_targets)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if args.cmd in ("check", "verify") else 2


if __name__ == "__main__":
    sys.exit(main())
