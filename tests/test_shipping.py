"""Shipping to edge boxes (ISSUE 17): compile targets, --check, one-file bundles, signatures, trust store.

One artifact is compiled per session, for x86-64-v3 (the demo model, fp32, three graphs), on whatever box runs
the tests; every other artifact here is a copy of it, altered. The demo checkpoint ships in the repository, so
no tiny checkpoints are generated.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from internvl_aot.runtime import bundle as bundles
from internvl_aot.runtime.check import UnverifiedArtifact, check
from internvl_aot.runtime.errors import ArtifactError
from internvl_aot.runtime.isa import TARGETS, X86_64_V4, cpu_flags

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "internvl-demo"
BUCKETS = "vision=1;prefill=32;batch=1;context=64;block_size=16"
PROMPTS = ["What colour is the star?", "How many squares are there?"]

# /proc/cpuinfo of an AVX2-only box (AMD EPYC, Zen 3: no AVX-512, no native bf16).
ZEN3_FLAGS = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
              "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid "
              "extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes "
              "xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch "
              "osvw topoext invpcid_single ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid rdseed "
              "adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves clzero xsaveerptr rdpru wbnoinvd arat "
              "npt nrip_save umip pku ospke vaes vpclmulqdq rdpid fsrm")


@pytest.fixture(scope="session")
def v3_artifact(tmp_path_factory):
    from internvl_aot.compile.buckets import Buckets
    from internvl_aot.compile.checkpoint import load_checkpoint
    from internvl_aot.compile.pipeline import compile_model

    cfg, weights = load_checkpoint(DEMO)
    out = tmp_path_factory.mktemp("ship") / "demo-v3"
    compile_model(cfg, weights, DEMO, out, Buckets.parse(BUCKETS), dtype="fp32", source={"path": str(DEMO)},
                  log=lambda m: None, target="x86-64-v3")
    return out


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERNVL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("INTERNVL_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("INTERNVL_CPUINFO", raising=False)


@pytest.fixture
def art(v3_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(v3_artifact, dst)
    return dst


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    from internvl_aot.runtime.signing import generate_key
    root = tmp_path_factory.mktemp("keys")
    generate_key(root / "build")
    generate_key(root / "other")
    store = root / "trusted"
    store.mkdir()
    shutil.copy(root / "build.pub", store / "build.pub")
    return {"key": root / "build.key", "other": root / "other.key", "store": store}


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "internvl_aot.runtime.artifact_cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def _sign(path, key):
    p = _cli("sign", "--key", str(key), str(path))
    assert p.returncode == 0, p.stderr


def _greedy(path, prompts=PROMPTS, n=8):
    from internvl_aot.runtime.engine import Engine, Request
    from internvl_aot.runtime.sampler import SamplingParams
    engine = Engine.from_artifact(path)
    reqs = [Request(prompt=q, params=SamplingParams(max_new_tokens=n, ignore_eos=True)) for q in prompts]
    return [r.output_token_ids for r in engine.generate(reqs)]


@pytest.fixture
def no_native_loads(monkeypatch):
    """Fail the test if the runtime maps weights or opens a graph's shared library."""
    import internvl_aot.runtime.artifact as ra

    def boom(*a, **k):
        raise AssertionError("native code or weights were loaded")
    monkeypatch.setattr(ra, "load_graph", boom)
    monkeypatch.setattr(ra, "load_weights", boom)


# ------------------------------------------------------------------------------------------ targets
def test_target_decides_march_and_vector_isa_without_compiling():
    from torch._inductor import cpu_vec_isa
    from torch._inductor.cpp_builder import _get_cpu_arch_cflags

    from internvl_aot.compile import targets
    seen = {}
    for name in ("x86-64-v3", "x86-64-v4", "x86-64-v4-bf16"):
        with targets.activate(targets.resolve(name)) as t:
            isa = cpu_vec_isa.pick_vec_isa()
            seen[name] = (isa.bit_width(), isa.build_arch_flags(), _get_cpu_arch_cflags("g++"),
                          targets.current().native_bf16, os.environ.get("ATEN_CPU_CAPABILITY"))
            assert t.name == name
    assert seen["x86-64-v3"][:3] == (256, "-mavx2 -mfma -mf16c", ["march=x86-64-v3"])
    v4, v4bf16 = seen["x86-64-v4"], seen["x86-64-v4-bf16"]
    assert v4[0] == 512 and v4[2] == ["march=x86-64-v4"] and "-mavx512f" in v4[1]
    # On an AMX box Inductor alone would pick VecAMX (-mamx-tile, -mavx512bf16): the targets must not.
    assert "amx" not in v4[1] and "bf16" not in v4[1] and "amx" not in v4bf16[1]
    assert "-mavx512bf16" in v4bf16[1]
    assert [seen[n][3] for n in seen] == [False, False, True]       # native bf16, for the lowerings
    assert all(seen[n][4] is None for n in seen)                     # ATEN_CPU_CAPABILITY set aside
    with targets.activate(targets.resolve("native")):
        assert _get_cpu_arch_cflags("g++") == ["march=native"]
    assert targets.current().name == "native"
    assert set(TARGETS["x86-64-v4-bf16"].flags) == set(X86_64_V4) | {"avx512_bf16"}


def test_v3_artifact_records_its_target_and_holds_no_avx512_code(v3_artifact):
    dev = json.loads((v3_artifact / "manifest.json").read_text())["device"]
    assert dev["target"] == "x86-64-v3" and dev["march"] == "x86-64-v3" and dev["vec_isa"] == "avx2"
    assert dev["native_bf16"] is False
    assert {"avx2", "fma", "f16c"} <= set(dev["isa"]) and not any(f.startswith("avx512") for f in dev["isa"])
    assert dev["built_on"]["isa"]          # the build box is recorded too
    objdump = shutil.which("objdump")
    packages = sorted((v3_artifact / "rank0" / "graphs").glob("*.pt2"))
    assert len(packages) == 3
    for pkg in packages:
        with zipfile.ZipFile(pkg) as z:
            metas = [json.loads(z.read(n)) for n in z.namelist() if n.endswith("wrapper_metadata.json")]
            assert metas and all(m["AOTI_CPU_ISA"] == "AVX2" for m in metas), pkg.name
            sos = [n for n in z.namelist() if n.endswith(".so")]
            assert sos, pkg.name
            if objdump:
                for n in sos:
                    so = v3_artifact.parent / Path(n).name
                    so.write_bytes(z.read(n))
                    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True,
                                         text=True).stdout
                    so.unlink()
                    # AVX-512 code uses zmm registers or k masks (EVEX); AVX2 code uses ymm.
                    assert "ymm" in asm, n
                    assert "zmm" not in asm and "%k1" not in asm, f"{pkg.name}: AVX-512 instructions in {n}"


def test_v3_artifact_greedy_tokens_equal_the_eager_model_fp32(v3_artifact):
    # This box has AVX2 as well as AVX-512, so the x86-64-v3 code runs here; the native artifact equals the
    # eager model token for token (test_artifact.py), so the v3 artifact equals the native one.
    from internvl_aot.compile.buckets import Buckets
    from internvl_aot.compile.checkpoint import load_checkpoint
    from internvl_aot.compile.eager import eager_engine
    from internvl_aot.runtime.engine import Request
    from internvl_aot.runtime.sampler import SamplingParams

    assert "avx2" in cpu_flags()
    cfg, weights = load_checkpoint(DEMO)
    eager = eager_engine(cfg, weights, DEMO, Buckets.parse(BUCKETS))
    reqs = [Request(prompt=q, params=SamplingParams(max_new_tokens=8, ignore_eos=True)) for q in PROMPTS]
    assert _greedy(v3_artifact) == [r.output_token_ids for r in eager.generate(reqs)]


def test_avx2_box_runs_v3_and_refuses_a_native_avx512_artifact_naming_the_flags(art, tmp_path, monkeypatch,
                                                                                  no_native_loads):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: {ZEN3_FLAGS}\n")
    monkeypatch.setenv("INTERNVL_CPUINFO", str(cpuinfo))
    assert all(f.ok for f in check(art))
    m = json.loads((art / "manifest.json").read_text())
    m["device"].update(target="native", march="native", isa=["avx2", "fma", "f16c", "avx512f", "avx512bw",
                                                               "avx512_bf16", "amx_tile"])
    (art / "manifest.json").write_text(json.dumps(m))
    bad = [f for f in check(art) if not f.ok]
    assert len(bad) == 1 and bad[0].what == "cpu"
    assert "lacks: avx512f, avx512bw, avx512_bf16, amx_tile" in bad[0].message and "TARGET=x86-64-v3" in bad[0].message
    from internvl_aot.runtime.engine import Engine
    with pytest.raises(ArtifactError, match=r"target native, which needs CPU flags this CPU lacks: avx512f"):
        Engine.from_artifact(art)


# ---------------------------------------------------------------------------------------- check
def test_check_lists_every_reason_and_loads_no_native_code(art):
    m = json.loads((art / "manifest.json").read_text())
    m["torch_version"] = "2.99.0+cpu"
    m["device"]["isa"] = m["device"]["isa"] + ["no_such_flag"]
    (art / "manifest.json").write_text(json.dumps(m))
    (art / "tokenizer" / "tokenizer.model").unlink()
    w = art / "rank0" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 1
    w.write_bytes(bytes(data))
    # torch is made unimportable: the check must not need it (nor any graph library).
    code = ("import sys; sys.modules['torch'] = None\n"
            "from internvl_aot.runtime.artifact_cli import main; sys.exit(main())")
    p = subprocess.run([sys.executable, "-c", code, "check", str(art)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    out = p.stdout
    assert "tokenizer/tokenizer.model is missing" in out
    assert "rank0/weights.safetensors does not match its sha256" in out
    assert "compiled with torch 2.99.0+cpu" in out
    assert "lacks: no_such_flag" in out
    assert out.strip().splitlines()[-1].startswith("NO: this box cannot run") and "(4 problems)" in out


def test_check_ok_exits_0_through_internvl_run(v3_artifact):
    p = subprocess.run([sys.executable, "-m", "internvl_aot.runtime.cli", "--artifact", str(v3_artifact), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok    cpu        target x86-64-v3" in p.stdout and p.stdout.strip().endswith(f"can run {v3_artifact}")


# -------------------------------------------------------------------------------------- bundles
def test_bundle_is_a_plain_tar_manifest_first_reproducible_and_runs(art, tmp_path):
    b1, b2 = tmp_path / "m.ivl", tmp_path / "again.ivl"
    info = bundles.pack(art, b1)
    bundles.pack(art, b2)
    assert b1.read_bytes() == b2.read_bytes() and info["sha256"] == bundles.sha256_file(b1)
    with tarfile.open(b1) as t:
        names = t.getnames()
    manifest = json.loads((art / "manifest.json").read_text())
    assert names == ["manifest.json"] + list(manifest["files"])
    assert _greedy(b1) == _greedy(art)
    cached = bundles.cache_root() / info["sha256"][:32]
    assert (cached / "manifest.json").read_bytes() == (art / "manifest.json").read_bytes()
    assert not [p for p in bundles.cache_root().iterdir() if p.name.endswith(".partial")]
    assert all(f.ok for f in check(b1))
    out = tmp_path / "unpacked"
    p = _cli("unpack", str(b1), "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert sorted(x.relative_to(out).as_posix() for x in out.rglob("*")) == sorted(
        x.relative_to(art).as_posix() for x in art.rglob("*"))


def test_two_processes_resolving_one_bundle_unpack_it_once(art, tmp_path):
    b = tmp_path / "m.ivl"
    bundles.pack(art, b)
    code = "import sys; from internvl_aot.runtime.bundle import resolve_artifact; print(resolve_artifact(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = {o.strip() for o, _ in outs}
    assert len(dirs) == 1
    assert sorted(x.name for x in bundles.cache_root().iterdir() if x.is_dir() and x.name != "index") == \
        [Path(dirs.pop()).name]


@pytest.mark.parametrize("damage", ["truncate", "flip_weight_byte", "flip_graph_byte"])
def test_damaged_bundle_is_refused_in_one_line_before_loading(art, tmp_path, damage, no_native_loads):
    b = tmp_path / "m.ivl"
    bundles.pack(art, b)
    data = bytearray(b.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        member = "rank0/weights.safetensors" if damage == "flip_weight_byte" else "rank0/graphs/decode_b1_c64.pt2"
        with tarfile.open(fileobj=__import__("io").BytesIO(bytes(data))) as t:
            m = t.getmember(member)
        data[m.offset_data + m.size // 2] ^= 0x40
    b.write_bytes(bytes(data))
    from internvl_aot.runtime.engine import Engine
    with pytest.raises(ArtifactError) as e:
        Engine.from_artifact(b)
    msg = str(e.value)
    assert "\n" not in msg and "copy it again" in msg
    assert ("truncated" in msg) if damage == "truncate" else ("does not match its sha256" in msg)
    assert not [p for p in bundles.cache_root().iterdir() if p.is_dir() and p.name != "index"]
    if damage == "truncate":
        p = subprocess.run([sys.executable, "-m", "internvl_aot.runtime.cli", "--artifact", str(b), "--prompt", "x"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.startswith("error: bundle") and p.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- signatures, trust
def test_signed_artifact_and_bundle_run_under_a_trust_store(art, tmp_path, keys, monkeypatch):
    _sign(art, keys["key"])
    b = tmp_path / "signed.ivl"
    bundles.pack(art, b)
    with tarfile.open(b) as t:
        assert t.getnames()[:2] == ["manifest.json", "manifest.sig"]
    p = _cli("verify", "--trusted-keys", str(keys["store"]), str(b))
    assert p.returncode == 0 and "signed by trusted key" in p.stdout, p.stdout
    monkeypatch.setenv("INTERNVL_TRUSTED_KEYS", str(keys["store"]))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedArtifact)    # trusted: no "unverified" note
        assert _greedy(b, PROMPTS[:1], 4) == _greedy(art, PROMPTS[:1], 4)


def test_signing_a_bundle_in_place(art, tmp_path, keys):
    b = tmp_path / "u.ivl"
    bundles.pack(art, b)
    _sign(b, keys["key"])
    with tarfile.open(b) as t:
        assert t.getnames()[:2] == ["manifest.json", "manifest.sig"]
    assert all(f.ok for f in check(b, keys["store"]))


def _tamper_weight(a):
    w = a / "rank0" / "weights.safetensors"
    d = bytearray(w.read_bytes())
    d[len(d) // 2] ^= 1
    w.write_bytes(bytes(d))


def _tamper_graph(a):
    g = a / "rank0" / "graphs" / "prefill_t32_c64.pt2"
    d = bytearray(g.read_bytes())
    d[len(d) // 3] ^= 1
    g.write_bytes(bytes(d))


def _tamper_manifest(a):
    m = json.loads((a / "manifest.json").read_text())
    m["generation"]["stop_token_ids"] = [0]
    (a / "manifest.json").write_text(json.dumps(m, indent=2))


def _tamper_manifest_and_hashes(a):
    # An attacker who swaps a graph library and writes its new sha256 into the manifest.
    from internvl_aot.runtime.manifest import sha256_file
    _tamper_graph(a)
    m = json.loads((a / "manifest.json").read_text())
    m["files"]["rank0/graphs/prefill_t32_c64.pt2"] = sha256_file(a / "rank0" / "graphs" / "prefill_t32_c64.pt2")
    (a / "manifest.json").write_text(json.dumps(m, indent=2))


def _extra_tokenizer_file(a):
    (a / "tokenizer" / "tokenizer.json").write_text("{}")


CASES = {
    "tampered weight file": (_tamper_weight, "rank0/weights.safetensors does not match its sha256"),
    "tampered graph library": (_tamper_graph, "prefill_t32_c64.pt2 does not match its sha256"),
    "tampered manifest": (_tamper_manifest, r"signature \(key [0-9a-f]+\) does not match its manifest.json"),
    "graph swapped, manifest hashes rewritten": (_tamper_manifest_and_hashes, "does not match its manifest.json"),
    "file added after signing": (_extra_tokenizer_file, "file\\(s\\) its signed manifest does not list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trust_store_refuses_altered_signed_artifacts_before_loading(art, keys, case, monkeypatch, no_native_loads):
    from internvl_aot.runtime.engine import Engine
    _sign(art, keys["key"])
    tamper, message = CASES[case]
    tamper(art)
    monkeypatch.setenv("INTERNVL_TRUSTED_KEYS", str(keys["store"]))
    for skip_verify in (False, True):       # with a trust store, --skip-verify does not skip the hashes
        with pytest.raises(ArtifactError, match=message) as e:
            Engine.from_artifact(art, skip_verify=skip_verify)
        assert "\n" not in str(e.value)
    assert not all(f.ok for f in check(art))


def test_trust_store_refuses_unsigned_wrong_key_and_another_artifacts_signature(art, tmp_path, keys, monkeypatch,
                                                                                no_native_loads):
    from internvl_aot.runtime.engine import Engine
    monkeypatch.setenv("INTERNVL_TRUSTED_KEYS", str(keys["store"]))
    with pytest.raises(ArtifactError, match=r"is not signed, and the trust store .* requires a signature"):
        Engine.from_artifact(art)
    _sign(art, keys["other"])
    with pytest.raises(ArtifactError, match=r"signed by key [0-9a-f]{16}, which is not in the trust store"):
        Engine.from_artifact(art)
    # A genuine signature, by the trusted key, of another artifact (same model, another compile).
    other = tmp_path / "other"
    shutil.copytree(art, other)
    m = json.loads((other / "manifest.json").read_text())
    m["created"] = "2026-01-01T00:00:00+0000"
    (other / "manifest.json").write_text(json.dumps(m, indent=2))
    _sign(other, keys["key"])
    shutil.copy(other / "manifest.sig", art / "manifest.sig")
    with pytest.raises(ArtifactError, match=r"signature belongs to another artifact"):
        Engine.from_artifact(art)
    p = subprocess.run([sys.executable, "-m", "internvl_aot.runtime.cli", "--artifact", str(art), "--prompt", "x",
                        "--trusted-keys", str(keys["store"])], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error:") and p.stderr.count("\n") == 1


def test_without_a_trust_store_unsigned_runs_with_one_note_and_tampering_is_still_caught(art, keys, tmp_path):
    from internvl_aot.runtime.engine import Engine
    import warnings
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        Engine.from_artifact(art)
    said = [str(n.message) for n in notes if issubclass(n.category, UnverifiedArtifact)]
    assert len(said) == 1 and "unsigned and unverified" in said[0]
    p = subprocess.run([sys.executable, "-m", "internvl_aot.runtime.cli", "--artifact", str(art), "--prompt",
                        PROMPTS[0], "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("unverified") == 1
    # Signed, no store: a tampered weight is caught by its sha256, a tampered manifest by the embedded key.
    _sign(art, keys["key"])
    _tamper_manifest(art)
    with pytest.raises(ArtifactError, match="does not match its manifest.json"):
        Engine.from_artifact(art)


def test_runtime_install_pulls_only_the_runtime_dependencies():
    # `make check-runtime-venv` installs into a fresh venv and runs a signed bundle there (minutes: not in CI);
    # this is its cheap half: the package without extras asks for the runtime's dependencies and nothing else.
    import re
    from importlib import metadata
    try:
        import tomllib
    except ImportError:          # Python 3.10
        tomllib = None
    want = {"torch", "numpy", "pillow", "safetensors", "sentencepiece", "tokenizers", "cryptography"}
    if tomllib is not None:
        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        assert {re.split(r"[<>=!~ ;\[]", d)[0].lower() for d in deps} == want
    installed = [r for r in (metadata.requires("internvl-aot") or []) if "extra ==" not in r]
    assert {re.split(r"[<>=!~ ;\[(]", r)[0].lower() for r in installed} == want
    assert "internvl-artifact" in {e.name for e in metadata.entry_points(group="console_scripts")}


def test_compile_cli_takes_the_named_targets_only(capsys):
    from internvl_aot.compile.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--model", "internvl-demo", "--target", "x86-64-v9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'x86-64-v9'" in err and "x86-64-v3" in err and "x86-64-v4-bf16" in err
    from internvl_aot.compile.pipeline import compile_model
    with pytest.raises(ValueError, match="TARGET=x86-64-v3 is a CPU target"):
        compile_model(None, {}, DEMO, Path("unused"), None, backend="cuda", target="x86-64-v3")
