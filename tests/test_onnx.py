"""BACKEND=onnx: the tiny checkpoint's ONNX artifacts (opset 18 and 15) give the AOTInductor artifact's greedy
tokens in fp32 (single image, multi-image, text, a mixed-length batch); weights are stored once for all
graphs; the opset-15 graphs use only opset-15 operators; the KV pool is not copied per call."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")          # the test extra installs onnx, onnxscript and onnxruntime
pytest.importorskip("onnxruntime")

from conftest import ARTIFACT_BUCKETS, ARTIFACT_CASES, checkpoint_dir, compile_tiny  # noqa: E402
from internvl_aot.compile.buckets import Buckets  # noqa: E402
from internvl_aot.compile.checkpoint import load_checkpoint  # noqa: E402
from internvl_aot.runtime.engine import Engine, Request  # noqa: E402
from internvl_aot.runtime.sampler import SamplingParams  # noqa: E402
from test_artifact import _requests  # noqa: E402
from test_graphs_vs_transformers import _image  # noqa: E402

CASE = "internlm2_vit300m"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def onnx_artifact(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_artifacts")
    cache = {}

    def get(opset: int) -> Path:
        if opset not in cache:
            spec, fmt = ARTIFACT_CASES[CASE]
            cache[opset] = compile_tiny(tiny_checkpoints[spec], fmt, root / f"{CASE}-onnx{opset}", ARTIFACT_BUCKETS,
                                        backend="onnx", opset=opset)
        return cache[opset]

    return get


def _mixed_batch():
    reqs = [Request(prompt=q, params=SamplingParams(max_new_tokens=n, ignore_eos=True))
            for q, n in zip(["Hi", "Tell me a long story about the quick brown fox, please.", "Why?"], [5, 17, 9])]
    reqs.append(Request(prompt="Describe it.", images=[_image(5, 500, 300)], max_tiles=2,
                        params=SamplingParams(max_new_tokens=11, ignore_eos=True)))
    return reqs


@pytest.mark.parametrize("opset", [18, 15])
def test_onnx_tokens_equal_aoti(opset, onnx_artifact, tiny_artifact):
    art = onnx_artifact(opset)
    ours = Engine.from_artifact(art)
    aoti = Engine.from_artifact(tiny_artifact(CASE))
    for reqs in (_requests(), _mixed_batch()):        # single image, multi-image, text; then a mixed batch
        a, b = ours.generate(reqs), aoti.generate(reqs)
        for req, x, y in zip(reqs, a, b):
            assert x.prompt_token_ids == y.prompt_token_ids
            assert x.output_token_ids == y.output_token_ids, (opset, req.prompt)
            assert x.num_tiles == y.num_tiles
    assert [r.num_tiles for r in a] == [[], [], [], [3]]
    graphs = ours.runner.graphs
    assert set(graphs) == set(Buckets.parse(ARTIFACT_BUCKETS).graph_names())
    assert all(g.calls > 0 for g in graphs.values())     # every bucket graph ran through onnxruntime


@pytest.mark.parametrize("opset", [18, 15])
def test_weights_stored_once_and_opset(opset, onnx_artifact, tiny_checkpoints):
    art = onnx_artifact(opset)
    manifest = json.loads((art / "manifest.json").read_text())
    entry = manifest["ranks"][0]
    data = art / entry["weights"]
    index = entry["weights_index"]
    from internvl_aot.graphs.model import build_model
    spec, fmt = ARTIFACT_CASES[CASE]
    cfg, weights = load_checkpoint(checkpoint_dir(tiny_checkpoints[spec], fmt))
    model_bytes = sum(t.numel() * t.element_size() for t in build_model(cfg, weights).state_dict().values())
    llm = manifest["model"]["config"]["llm"]
    rope = 2 * max(manifest["buckets"]["context"]) * llm["head_dim"] * 4       # the cos and sin tables
    # Each distinct tensor once (fused and pre-transposed copies replace their originals, deduplicated by
    # content across graphs): the model's weights + the RoPE tables + a few small masks. One copy per
    # graph would be 5x.
    assert model_bytes < data.stat().st_size <= model_bytes + rope + (64 << 10)
    external_refs = 0
    for name, g in entry["graphs"].items():
        path = art / g["onnx"]
        m = onnx.load(str(path), load_external_data=False)
        assert path.stat().st_size < 0.2 * data.stat().st_size, name       # graphs hold no weights
        assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [opset]
        for init in m.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                loc = {e.key: e.value for e in init.external_data}
                assert loc["location"] == "weights.bin"
                key = g["initializers"][init.name]
                assert int(loc["offset"]) == index[key]["offset"]
                external_refs += 1
        for node in m.graph.node:         # every operator exists in this opset in the form used
            assert onnx.defs.get_schema(node.op_type, opset, node.domain or "").since_version <= opset \
                or node.op_type in ("Pad",), (name, node.op_type)
        onnx.checker.check_model(str(path))
    assert external_refs >= 5 * 10
    text = (art / "README.md").read_text()
    assert "atc --framework=5" in text and text.count("atc --framework=5") == len(entry["graphs"])


def _vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def test_kv_pool_is_not_copied_per_step(onnx_artifact):
    """A decode step over a 256 MB pool: peak RSS grows by far less than the pool (a copy of K or V, in or out
    of onnxruntime, would add 128 MB), the new rows land in the pool in place, and nothing else changes."""
    from internvl_aot.runtime.onnx.graphs import load_graphs
    art = onnx_artifact(18)
    manifest = json.loads((art / "manifest.json").read_text())
    graphs = load_graphs(art, manifest, threads=1)
    llm = manifest["model"]["config"]["llm"]
    bs = manifest["buckets"]["block_size"]
    kvh, d, layers = llm["num_kv_heads"], llm["head_dim"], llm["num_layers"]
    blocks = (128 << 20) // (layers * bs * kvh * d * 4)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((layers, blocks, bs, kvh, d), dtype=np.float32)
    v = rng.standard_normal((layers, blocks, bs, kvh, d), dtype=np.float32)
    g = graphs["decode_b4_c2048"]
    mb = 2048 // bs
    tables = np.zeros((4, mb), np.int64)
    tables[:, :3] = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    pos = np.array([40, 33, 20, 47], np.int64)
    slots = tables[np.arange(4), pos // bs] * bs + pos % bs
    args = (np.array([5, 6, 7, 8], np.int64), pos, slots, tables, k, v)
    k_before, v_before = k.copy(), v.copy()              # (copies made before the peak is reset)
    g(*args)                                            # warm-up: sessions and arena allocated
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                    # resets VmHWM to the current RSS
    base = _vm_hwm()
    for _ in range(3):
        logits = g(*args)
    grown = _vm_hwm() - base
    assert grown < 32 << 20, f"peak RSS grew {grown / 2**20:.0f} MB over a {2 * k.nbytes / 2**20:.0f} MB pool"
    assert logits.shape == (4, llm["vocab_size"])
    blk, off = slots // bs, slots % bs
    changed = np.zeros(k.shape[1:3], bool)
    changed[blk, off] = True
    assert not np.array_equal(k[:, blk, off], k_before[:, blk, off])           # the rows were written ...
    assert np.array_equal(k[:, ~changed], k_before[:, ~changed])               # ... and nothing else
    assert np.array_equal(v[:, ~changed], v_before[:, ~changed])


def test_onnx_refusals():
    from internvl_aot.compile.backends.onnx import check_onnx_request
    with pytest.raises(ValueError, match="bf16"):
        check_onnx_request("bf16", 1, 18)
    with pytest.raises(ValueError, match="TP=1"):
        check_onnx_request("fp32", 2, 18)
    with pytest.raises(ValueError, match="OPSET"):
        check_onnx_request("fp32", 1, 19)
    with pytest.raises(ValueError, match="TARGET"):
        check_onnx_request("fp32", 1, 18, "x86-64-v3")


_TORCH_FREE_RUN = r"""
import json, sys
sys.modules["torch"] = None          # any `import torch` on this path fails
from internvl_aot.runtime.engine import Engine, Request
from internvl_aot.runtime.onnx.engine import NumpyEngine
from internvl_aot.runtime.sampler import SamplingParams
spec = json.loads(sys.argv[2])
engine = Engine.from_artifact(sys.argv[1], threads=1)
assert isinstance(engine, NumpyEngine), type(engine)
reqs = [Request(prompt=r["prompt"], images=r["images"], max_tiles=r["max_tiles"],
                params=SamplingParams(max_new_tokens=r["n"], ignore_eos=True)) for r in spec]
out = engine.generate(reqs)
assert [m for m in sys.modules if m == "torch" or m.startswith("torch.")] in ([], ["torch"])
print(json.dumps([[r.prompt_token_ids, r.output_token_ids, r.num_tiles] for r in out]))
"""


def test_torch_free_engine_tokens_equal_aoti(onnx_artifact, tiny_artifact, tmp_path):
    """The numpy engine (no torch importable in its process) gives the AOTInductor artifact's tokens:
    single image, multi-image, text, and a mixed-length batch, in one generate call."""
    import subprocess
    import sys
    paths = []
    for seed, (w, h) in enumerate([(700, 400), (300, 300), (200, 900), (500, 300)], 1):
        paths.append(str(tmp_path / f"img{seed}.png"))
        _image(seed, w, h).save(paths[-1])
    spec = [dict(prompt="What is shown in this picture?", images=[paths[0]], max_tiles=2, n=24),
            dict(prompt="Image-1: <image>\nImage-2: <image>\nCompare them.", images=paths[1:3], max_tiles=2, n=24),
            dict(prompt="Hello, world! Please answer the question briefly.", images=[], max_tiles=None, n=24),
            dict(prompt="Hi", images=[], max_tiles=None, n=5),
            dict(prompt="Describe it.", images=[paths[3]], max_tiles=2, n=11)]
    p = subprocess.run([sys.executable, "-c", _TORCH_FREE_RUN, str(onnx_artifact(18)), json.dumps(spec)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = json.loads(p.stdout.strip().splitlines()[-1])
    reqs = [Request(prompt=r["prompt"], images=r["images"], max_tiles=r["max_tiles"],
                    params=SamplingParams(max_new_tokens=r["n"], ignore_eos=True)) for r in spec]
    aoti = Engine.from_artifact(tiny_artifact(CASE)).generate(reqs)
    for r, (prompt_ids, out_ids, tiles), a in zip(spec, ours, aoti):
        assert prompt_ids == a.prompt_token_ids
        assert out_ids == a.output_token_ids, r["prompt"]
        assert tiles == a.num_tiles
    assert [t for _, _, t in ours] == [[3], [1, 3], [], [], [3]]


def test_onnx_imports_are_isolated():
    """onnx/onnxscript/onnx_ir only in compile/backends/onnx*.py; onnxruntime only in runtime/onnx/; runtime/onnx/
    imports neither torch nor compile/ nor graphs/ (the torch-free box runs it alone)."""
    from conftest import project_imports
    for rel, mod, level in project_imports():
        first = mod.split(".")[0]
        if level:                   # a relative import inside internvl_aot
            if rel.startswith("runtime/onnx/"):
                assert not (level >= 3 and first in ("compile", "graphs")), (rel, mod)
            continue
        if first in ("onnx", "onnxscript", "onnx_ir"):
            assert rel.startswith("compile/backends/onnx"), (rel, mod)
        if first == "onnxruntime":
            assert rel.startswith("runtime/onnx/") or rel == "tools/onnx_bench.py", (rel, mod)
        if rel.startswith("runtime/onnx/"):
            assert first != "torch", (rel, mod)
            assert first != "internvl_aot" or ".compile" not in mod and ".graphs" not in mod, (rel, mod)
