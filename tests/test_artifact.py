"""Compiled artifacts: same tokens as the eager graphs and as transformers, batching,
relocation, verification errors, and the CLI without transformers."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import ARTIFACT_BUCKETS, ARTIFACT_CASES, checkpoint_dir
from internvl_aot.compile.buckets import Buckets
from internvl_aot.compile.checkpoint import load_checkpoint
from internvl_aot.compile.eager import eager_engine
from internvl_aot.runtime.engine import Engine, Request, RequestError
from internvl_aot.runtime.manifest import ArtifactError
from internvl_aot.runtime.sampler import SamplingParams
from test_graphs_vs_transformers import _image, hf_greedy

REPO = Path(__file__).resolve().parents[1]


def _requests(n=24):
    p = SamplingParams(max_new_tokens=n, ignore_eos=True)
    return [Request(prompt="What is shown in this picture?", images=[_image(1, 700, 400)], max_tiles=2, params=p),
            Request(prompt="Image-1: <image>\nImage-2: <image>\nCompare them.",
                    images=[_image(2, 300, 300), _image(3, 200, 900)], max_tiles=2, params=p),
            Request(prompt="Hello, world! Please answer the question briefly.", params=p)]


@pytest.mark.parametrize("case", list(ARTIFACT_CASES))
def test_artifact_tokens_equal_eager_and_transformers(case, tiny_artifact, tiny_checkpoints, tiny_hf_model):
    art = tiny_artifact(case)
    spec, fmt = ARTIFACT_CASES[case]
    src = checkpoint_dir(tiny_checkpoints[spec], fmt)
    engine = Engine.from_artifact(art)
    reqs = _requests()
    ours = engine.generate(reqs)
    cfg, weights = load_checkpoint(src)
    eager = eager_engine(cfg, weights, src, Buckets.parse(ARTIFACT_BUCKETS)).generate(reqs)
    hf = tiny_hf_model(spec)
    for req, a, e in zip(reqs, ours, eager):
        assert a.prompt_token_ids == e.prompt_token_ids
        assert a.output_token_ids == e.output_token_ids, req.prompt
        tiles = engine.make_sequence(req).pixel_values
        assert a.output_token_ids == hf_greedy(hf, a.prompt_token_ids, tiles, 24), req.prompt
    assert [r.num_tiles for r in ours] == [[3], [1, 3], []]


def test_mixed_length_batch_equals_each_alone(tiny_artifact):
    engine = Engine.from_artifact(tiny_artifact("internlm2_vit300m"))
    lengths = [5, 17, 9]
    reqs = [Request(prompt=q, params=SamplingParams(max_new_tokens=n, ignore_eos=True))
            for q, n in zip(["Hi", "Tell me a long story about the quick brown fox, please.", "Why?"], lengths)]
    reqs.append(Request(prompt="Describe it.", images=[_image(5, 500, 300)], max_tiles=2,
                        params=SamplingParams(max_new_tokens=11, ignore_eos=True)))
    together = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    for t, a in zip(together, alone):
        assert t.output_token_ids == a.output_token_ids
    assert [len(t.output_token_ids) for t in together] == lengths + [11]
    # Every block went back to the pool.
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks - 1


def test_cpu_graphs_get_only_the_blocks_in_use(tiny_artifact):
    """CPU artifacts' prefill/decode graphs take block tables of any width up to their context bucket
    (compile/export.py dynamic_tables), and the runner passes the blocks in use: the same tokens as
    the tables padded to the bucket's full width, through the same graphs."""
    from internvl_aot.runtime.model_runner import table_width_is_dynamic
    engine = Engine.from_artifact(tiny_artifact("qwen2_vit300m"))
    runner = engine.runner
    staged = {n: g for n, g in runner.graphs.items() if not n.startswith("vision")}
    assert staged and all(table_width_is_dynamic(g) for g in staged.values()) and runner._trim == set(staged)
    widths = []
    for name, g in staged.items():
        def spy(*inputs, _g=g, _n=name):
            widths.append((_n, inputs[5 if _n.startswith("prefill") else 3].shape[1]))
            return _g(*inputs)
        runner.graphs[name] = spy
    reqs = _requests(12)
    trimmed = engine.generate(reqs)
    full_width = 2048 // 16
    assert widths and max(w for _, w in widths) < full_width and len({w for _, w in widths}) > 2
    runner._trim = set()                                   # pad every table to the bucket's width
    widths.clear()
    padded = engine.generate(reqs)
    assert {w for _, w in widths} == {full_width}
    assert [r.output_token_ids for r in trimmed] == [r.output_token_ids for r in padded]


def test_sampling_is_reproducible_per_seed(tiny_artifact):
    engine = Engine.from_artifact(tiny_artifact("internlm2_vit300m"))
    p = dict(temperature=0.9, top_k=50, top_p=0.9, max_new_tokens=12, ignore_eos=True)
    a = engine.generate([Request(prompt="Hi", params=SamplingParams(seed=7, **p))])[0]
    b = engine.generate([Request(prompt="Other", params=SamplingParams(seed=3, **p)),
                         Request(prompt="Hi", params=SamplingParams(seed=7, **p))])[1]
    assert a.output_token_ids == b.output_token_ids


def test_relocated_copy_and_tarball_run(tiny_artifact, tmp_path):
    art = tiny_artifact("qwen2_vit300m")
    req = [Request(prompt="Hello there", params=SamplingParams(max_new_tokens=8, ignore_eos=True))]
    expected = Engine.from_artifact(art).generate(req)[0].output_token_ids
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(art, moved)
    assert Engine.from_artifact(moved).generate(req)[0].output_token_ids == expected
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as t:
        t.add(art, arcname="shipped")
    with tarfile.open(tar) as t:
        t.extractall(tmp_path / "untarred", filter="data")
    assert Engine.from_artifact(tmp_path / "untarred" / "shipped").generate(req)[0].output_token_ids == expected


@pytest.fixture
def art_copy(tiny_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact("internlm2_vit300m"), dst)
    return dst


def test_corrupt_weight_byte_is_refused(art_copy):
    w = art_copy / "rank0" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"rank0/weights.safetensors does not match its sha256"):
        Engine.from_artifact(art_copy)


def test_deleted_graph_is_refused(art_copy):
    (art_copy / "rank0" / "graphs" / "decode_b1_c2048.pt2").unlink()
    with pytest.raises(ArtifactError, match=r"decode_b1_c2048.pt2 is missing"):
        Engine.from_artifact(art_copy, skip_verify=True)   # missing files are checked even then


def _edit_manifest(art, fn):
    m = json.loads((art / "manifest.json").read_text())
    fn(m)
    (art / "manifest.json").write_text(json.dumps(m))


def test_other_torch_version_is_refused(art_copy):
    _edit_manifest(art_copy, lambda m: m.update(torch_version="2.99.0+cpu"))
    with pytest.raises(ArtifactError, match=r"compiled with torch 2.99.0\+cpu.*install torch==2.99.0"):
        Engine.from_artifact(art_copy)


def test_missing_cpu_isa_is_refused(art_copy):
    _edit_manifest(art_copy, lambda m: m["device"].update(isa=m["device"]["isa"] + ["amx_tile"])
                   if "amx_tile" not in m["device"]["isa"] else m["device"].update(machine="riscv64"))
    with pytest.raises(ArtifactError, match=r"re-compile the artifact on this machine"):
        Engine.from_artifact(art_copy)


def test_prompt_longer_than_largest_bucket_is_refused_before_work(tiny_artifact):
    engine = Engine.from_artifact(tiny_artifact("internlm2_vit300m"))
    with pytest.raises(RequestError, match=r"largest context bucket is 2048"):
        engine.generate([Request(prompt="hello " * 3000)])
    with pytest.raises(RequestError, match=r"largest context bucket"):   # 2 x 9 tiles x 256 tokens
        engine.generate([Request(prompt="x", images=[_image(1, 1800, 400), _image(2, 1800, 400)], max_tiles=12)])
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks - 1


def test_kv_budget_too_small_is_a_clear_error(tiny_artifact):
    with pytest.raises(ValueError, match=r"kv-cache-gb"):
        Engine.from_artifact(tiny_artifact("internlm2_vit300m"), kv_cache_gb=1e-6)


BLOCKER = r"""
import sys, runpy
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformers" or name.startswith(("internvl_aot.compile", "internvl_aot.graphs")):
            raise ImportError(f"{name} is blocked: the runtime must not import it")
sys.meta_path.insert(0, Block())
sys.argv = ["internvl-run"] + sys.argv[1:]
from internvl_aot.runtime.cli import main
code = main()
bad = [m for m in sys.modules if m.startswith(("transformers", "internvl_aot.compile", "internvl_aot.graphs"))]
assert not bad, bad
sys.exit(code)
"""


def test_cli_runs_without_transformers(tiny_artifact, tmp_path):
    art = tiny_artifact("internlm2_vit300m")
    img = tmp_path / "pic.png"
    _image(9, 900, 400).save(img)
    cmd = [sys.executable, "-c", BLOCKER, "--artifact", str(art), "--image", str(img), "--prompt",
           "What is this?", "--max-new-tokens", "6", "--max-tiles", "2", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(out) >= {"text", "prompt_token_ids", "output_token_ids", "num_tiles", "timings"}
    assert set(out["timings"]) >= {"ttft_s", "decode_tokens_per_s", "total_s"}
    assert out["num_tiles"] == [3]
    expected = Engine.from_artifact(art).generate([Request(prompt="What is this?", images=[str(img)], max_tiles=2,
                                                           params=SamplingParams(max_new_tokens=6))])[0]
    assert out["output_token_ids"] == expected.output_token_ids
    assert out["prompt_token_ids"] == expected.prompt_token_ids


def test_cli_errors_are_one_line(tiny_artifact, tmp_path):
    art = tiny_artifact("internlm2_vit300m")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    run = [sys.executable, "-m", "internvl_aot.runtime.cli", "--artifact"]
    p = subprocess.run(run + [str(art), "--image", str(bad), "--prompt", "x"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "bad.jpg" in p.stderr
    p = subprocess.run(run + [str(tmp_path / "nope"), "--prompt", "x"], capture_output=True, text=True)
    assert p.returncode == 2 and "manifest.json is missing" in p.stderr


def test_compile_cli_refuses_bad_tp_and_unknown_weights(tmp_path):
    cli = [sys.executable, "-m", "internvl_aot.compile.cli"]
    p = subprocess.run(cli + ["--model", "internvl2-2b", "--tp", "3", "--out", str(tmp_path / "a")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "TP=3" in p.stderr and "TP values that work for this model: 1, 2, 4, 8, 16" in p.stderr
    env = dict(os.environ, INTERNVL_WEIGHTS=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    p = subprocess.run(cli + ["--model", "internvl2-2b", "--out", str(tmp_path / "a")], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 2 and "looked in" in p.stderr and str(tmp_path / "internvl2-2b") in p.stderr


def test_cpu_prefill_graphs_take_chunks_of_any_length(tiny_artifact):
    """CPU artifacts' prefill graphs take a chunk of n <= T tokens as n rows (compile/export.py
    dynamic_tokens): the runner passes the prompt's own lengths, not its buckets', and the tokens are
    those of the chunks padded to their buckets, through the same graphs (the artifact-against-
    transformers tests run the exact chunks)."""
    from internvl_aot.runtime.model_runner import chunk_length_is_dynamic
    engine = Engine.from_artifact(tiny_artifact("internlm2_vit300m"))
    runner = engine.runner
    prefill = {n: g for n, g in runner.graphs.items() if n.startswith("prefill")}
    assert prefill and all(chunk_length_is_dynamic(g) for g in prefill.values()) and runner._exact == set(prefill)
    assert runner.policy.exact_chunks
    lengths = []
    for name, g in prefill.items():
        def spy(*inputs, _g=g):
            lengths.append(inputs[0].shape[0])
            return _g(*inputs)
        runner.graphs[name] = spy
    reqs = _requests(12) + [Request(prompt="word " * 150, params=SamplingParams(max_new_tokens=6, ignore_eos=True))]
    exact = engine.generate(reqs)
    buckets = set(runner.policy.prefill)
    assert any(n not in buckets for n in lengths) and max(lengths) == max(buckets)   # 150 words: a full chunk, then the rest
    runner._exact = set()                                  # pad every chunk to its bucket
    runner.policy.exact_chunks = False
    lengths.clear()
    padded = engine.generate(reqs)
    assert set(lengths) <= buckets
    assert [r.output_token_ids for r in exact] == [r.output_token_ids for r in padded]
