"""Shared pytest fixtures: tiny random InternVL checkpoints in every supported format.

- `tiny_checkpoints`: dict spec name -> tiny_checkpoints.TinyCheckpoint (built once per session);
  `.hf_dir`, `.original_dirs[flavour]`, `.image_token_id`, `.load_hf_model()`.
- `tiny_checkpoint`: the same, parametrized over every spec.
- `tiny_hf_model(name)`: the transformers InternVLForConditionalGeneration of a spec
  (fp32, eval, weights checked against the file), cached per session.
"""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_checkpoints import SPECS, build_all, build_new  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("tiny_checkpoints"))


@pytest.fixture(scope="session")
def new_checkpoints(tmp_path_factory):
    """The Qwen3 and Phi-3 tiny checkpoints (tiny_checkpoints.NEW_SPECS), built once per session."""
    return build_new(tmp_path_factory.mktemp("new_checkpoints"))


@pytest.fixture(scope="session", params=list(SPECS))
def tiny_checkpoint(request, tiny_checkpoints):
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_checkpoints):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny_checkpoints[name].load_hf_model()
        return cache[name]

    return get


# ---------------------------------------------------------------- compiled tiny artifacts
# AOTInductor takes ~15 s per tiny graph on 2 cores, so each artifact is compiled once per
# session, with few buckets: 5 graphs (a 1-tile vision graph, two prefill chunk sizes,
# decode batch 1 and 4 over one context bucket).
ARTIFACT_BUCKETS = "vision=1;prefill=32,128;batch=1,4;context=2048;block_size=16"
ARTIFACT_CASES = {
    # name: (spec, checkpoint format): InternLM2, Llama and Qwen2 backbones, both ViT kinds
    "internlm2_vit300m": ("llama_vit300m", "internlm2"),
    "llama_vit6b": ("llama_vit6b", "llama"),
    "qwen2_vit300m": ("qwen2_vit300m", "hf"),
}


SOURCE_TREES = ("compile", "graphs", "runtime", "bench", "precision", "tools")


def project_imports(tops=SOURCE_TREES):
    """(path relative to the repository, module, level) for every import statement in the project's
    source trees: `import a.b` -> ("a.b", 0), `from ..x import y` -> ("x", 2). For import-isolation tests."""
    import ast
    root = Path(__file__).resolve().parents[1]
    for top in tops:
        for f in sorted((root / top).rglob("*.py")):
            rel = f.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    for a in node.names:
                        yield rel, a.name, 0
                elif isinstance(node, ast.ImportFrom):
                    yield rel, node.module or "", node.level


def checkpoint_dir(ck, fmt):
    return ck.hf_dir if fmt == "hf" else ck.original_dirs[fmt]


def compile_tiny(ck, fmt, out, buckets: str, dtype: str = "fp32", log=lambda m: None, **options):
    """Tiny checkpoint `ck` in format `fmt` -> an artifact at `out` (compile_model's other options as given)."""
    from internvl_aot.compile.buckets import Buckets
    from internvl_aot.compile.checkpoint import load_checkpoint
    from internvl_aot.compile.pipeline import compile_model

    src = checkpoint_dir(ck, fmt)
    cfg, weights = load_checkpoint(src)
    compile_model(cfg, weights, src, out, Buckets.parse(buckets), dtype=dtype, source={"path": str(src)},
                  log=log, **options)
    return out


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    cache = {}

    def get(name: str):
        if name not in cache:
            spec, fmt = ARTIFACT_CASES[name]
            cache[name] = compile_tiny(tiny_checkpoints[spec], fmt, root / name, ARTIFACT_BUCKETS)
        return cache[name]

    return get


# ---------------------------------------------------------------- the demo model, compiled once
DEMO_BUCKETS = "vision=1;prefill=512;batch=1,4;context=1024"


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory):
    """models/internvl-demo compiled as `make demo` does it (the compile CLI, the registry name, fp32 on
    the CPU), with DEMO_BUCKETS; shared by the demo-model and server tests."""
    import subprocess
    if os.environ.get("INTERNVL_TEST_DEMO_ARTIFACT"):      # a developer's already compiled copy (same buckets)
        return Path(os.environ["INTERNVL_TEST_DEMO_ARTIFACT"])
    out = tmp_path_factory.mktemp("demo") / "internvl-demo-tp1-cpu-fp32"
    p = subprocess.run([sys.executable, "-m", "internvl_aot.compile.cli", "--model", "internvl-demo", "--dtype", "fp32",
                        "--backend", "cpu", "--out", str(out), "--buckets", DEMO_BUCKETS],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return out
