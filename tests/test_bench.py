"""internvl-bench on a tiny compiled artifact: the CSV's shape, and transformers fed the
artifact's own (un-fused) weights producing our exact greedy tokens in fp32."""
import csv
import json

import pytest
import torch

from conftest import ARTIFACT_CASES, checkpoint_dir
from internvl_aot.bench.cli import COLUMNS, main, parse_batch_sizes
from internvl_aot.bench.hf_weights import canonical_from_artifact, canonical_to_hf
from internvl_aot.bench.measure import percentile, step_stats
from internvl_aot.compile.checkpoint import load_checkpoint


def test_parse_batch_sizes():
    assert parse_batch_sizes("1-10") == list(range(1, 11))
    assert parse_batch_sizes("8,1") == [1, 8]
    assert parse_batch_sizes("1-3,8") == [1, 2, 3, 8]
    with pytest.raises(ValueError):
        parse_batch_sizes("3-1")


def test_step_statistics():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([0.0, 1.0], 99) == pytest.approx(0.99)
    s = step_stats([0.1, 0.1, 0.2, 0.2], [4, 4, 4, 4])
    assert s["decode_ms_mean"] == 150 and s["decode_tok_s"] == pytest.approx(16 / 0.6, rel=1e-3)


def test_gemm_rate_falls_back_to_a_probe_where_a_call_would_be_slow():
    """measure_gemm_flops times the full shape where an 8-row probe says a call is quick, and reports the
    probe's rate where it is not (bf16 without a fast GEMM: minutes a call at the full shape)."""
    from internvl_aot.bench.measure import measure_gemm_flops
    full = measure_gemm_flops(("fp32",), m=64, k=128, n=256, repeats=2)
    assert full["gemm_rows"] == {"fp32": 64} and full["gemm_gflops"]["fp32"] > 0
    slow = measure_gemm_flops(("fp32", "bf16"), m=64, k=128, n=256, slow_call_s=0.0)
    assert slow["gemm_rows"] == {"fp32": 8, "bf16": 8} and min(slow["gemm_gflops"].values()) > 0
    # an artifact's own GEMM op (bf16 x [m, k], w [n, k]) is timed at the full shape beside torch's
    seen = []
    ops = measure_gemm_flops(("fp32",), m=64, k=128, n=256, repeats=2,
                             ops={"op": lambda x, w: seen.append((x.shape, w.shape)) or x @ w.t()})
    assert ops["gemm_rows"] == {"op": 64, "fp32": 64} and ops["gemm_gflops"]["op"] > 0
    assert set(seen) == {((64, 128), (256, 128))}


def test_unfused_artifact_weights_equal_the_checkpoint(tiny_artifact, tiny_checkpoints):
    """The artifact holds fused q/k/v and gate/up weights; un-fusing gives back the checkpoint's."""
    from safetensors.torch import load_file
    art = tiny_artifact("internlm2_vit300m")
    manifest = json.loads((art / "manifest.json").read_text())
    stored = load_file(str(art / manifest["ranks"][0]["weights"]))
    canonical = canonical_from_artifact(manifest, stored)
    spec, fmt = ARTIFACT_CASES["internlm2_vit300m"]
    _, want = load_checkpoint(checkpoint_dir(tiny_checkpoints[spec], fmt))
    assert set(canonical) == set(want)
    for k, t in want.items():
        assert torch.equal(canonical[k], t), k
    hf = canonical_to_hf(canonical)
    assert len(hf) == len(canonical) + 2 * sum(1 for k in canonical if k.endswith("attn.qkv.weight")) \
        + 2 * sum(1 for k in canonical if k.endswith("attn.qkv.bias"))


def test_bench_against_transformers(tiny_artifact, tmp_path):
    art = tiny_artifact("internlm2_vit300m")
    rc = main(["--artifact", str(art), "--batch-sizes", "1,2", "--output-tokens", "8", "--max-tiles", "1",
               "--compare", "transformers", "--out", str(tmp_path), "--threads", "1"])
    assert rc == 0
    with open(tmp_path / "benchmark.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert [(r["engine"], int(r["batch_size"])) for r in rows] == \
        [("ours", 1), ("ours", 2), ("transformers", 1), ("transformers", 2)]
    for r in rows:
        assert r["error"] == ""
        assert r["dtype"] == "fp32"
        assert int(r["output_tokens"]) == 8
        assert int(r["num_tiles"]) == 1 and int(r["input_tokens"]) > 256
        for col in ("ttft_s", "decode_ms_mean", "decode_ms_p99", "decode_tok_s", "e2e_tok_s", "peak_rss_mb",
                    "roofline_ms", "roofline_frac", "copy_gbs", "rss_over_weights_kv",
                    "ttft_tflop", "gemm_gflops", "ttft_compute_frac"):
            assert float(r[col]) > 0, col
        assert float(r["decode_ms_p99"]) >= float(r["decode_ms_mean"]) * 0.5
    ours = {int(r["batch_size"]): r for r in rows if r["engine"] == "ours"}
    for b, o in ours.items():
        # the first token's split: the vision and prefill steps fit in the time to the last first token, and the
        # prompt rate is all the batch's prompt tokens over the prefill steps
        vision, prefill = float(o["vision_s"]), float(o["prefill_s"])
        assert 0 < vision and 0 < prefill and vision + prefill <= float(o["ttft_max_s"])
        assert float(o["prefill_tok_s"]) == pytest.approx(b * int(o["input_tokens"]) / prefill, rel=1e-2)
    for r in rows:
        if r["engine"] == "transformers":
            assert int(r["match_tokens"]) == 8, "transformers with the un-fused weights gives other tokens"
            o = ours[int(r["batch_size"])]
            assert r["input_tokens"] == o["input_tokens"]
            assert float(r["ratio_decode_tok_s"]) == pytest.approx(
                float(o["decode_tok_s"]) / float(r["decode_tok_s"]), rel=1e-2)
            for col in ("ratio_ttft", "ratio_e2e_tok_s", "ratio_peak_rss"):
                assert float(r[col]) > 0
            assert r["ratio_prefill_tok_s"] == ""      # transformers' first token is not split
        else:
            assert r["ratio_decode_tok_s"] == "" and r["match_tokens"] == ""
    meta = json.loads((tmp_path / "benchmark.json").read_text())
    assert meta["bandwidth"]["copy_gbs"] > 0 and meta["machine"]["torch"] == torch.__version__
    assert meta["gemm"]["gemm_gflops"]["bf16"] > 0 and meta["gemm"]["gemm_gflops"]["fp32"] > 0
    assert meta["settings"]["batch_sizes"] == [1, 2]
    # a llama.cpp row (its worker needs llama-cpp-python: never in CI) gets the prompt-rate ratio against ours
    from internvl_aot.bench.cli import finish_rows
    o1 = next(r for r in meta["rows"] if r["engine"] == "ours" and r["batch_size"] == 1)
    theirs = dict(o1, engine="llama.cpp-f16", dtype="f16", prefill_tok_s=2 * o1["prefill_tok_s"])
    manifest = json.loads((art / "manifest.json").read_text())
    assert finish_rows([dict(o1), theirs], manifest, 10.0)[1]["ratio_prefill_tok_s"] == pytest.approx(0.5, rel=1e-2)


def test_openmp_wait_default_and_background_load():
    """internvl_aot makes OpenMP threads spin briefly, then sleep (GOMP_SPINCOUNT=1000, set before torch loads; an
    explicit setting wins); the benchmark's
    neighbours run while its block runs and are gone after it."""
    import os
    import subprocess
    import sys
    from internvl_aot.bench.background import background_load, omp_env
    code = "import internvl_aot, os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True).stdout.split()
    assert run(env) == ["1000", "None"]
    assert run(dict(env, OMP_WAIT_POLICY="ACTIVE")) == ["None", "ACTIVE"]
    assert run(dict(env, GOMP_SPINCOUNT="5")) == ["5", "None"]
    saved = {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    try:
        omp_env("passive")
        assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
        omp_env("spin1000")
        assert os.environ.get("GOMP_SPINCOUNT") == "1000" and "OMP_WAIT_POLICY" not in os.environ
        omp_env("libgomp-default")
        assert "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    with background_load(2, nice=19) as info:
        pids = info["pids"]
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)
        import time
        deadline = time.time() + 20                    # each sets its nice level once it is running
        while time.time() < deadline and not all(int(open(f"/proc/{p}/stat").read().split()[18]) == 19 for p in pids):
            time.sleep(0.05)
        assert all(int(open(f"/proc/{p}/stat").read().split()[18]) == 19 for p in pids)
    assert not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in pids)


@pytest.mark.parametrize("spec", ["llama_vit300m", "qwen2_vit6b"])   # select_layer -1: transformers runs every ViT layer
def test_prefill_flops_match_torch_flop_counter_on_transformers(spec, tiny_checkpoints, tiny_hf_model):
    """The TTFT compute bound's FLOP count (bench.measure.prefill_flop_parts) against PyTorch's own
    FlopCounterMode over transformers' InternVL forward (eager attention: QK^T and PV are bmm, every
    weight matrix an mm/addmm/convolution), one tile and the prompt, logits for the last position."""
    from torch.utils.flop_counter import FlopCounterMode
    from internvl_aot.bench.measure import prefill_flop_parts, prefill_flops

    ck = tiny_checkpoints[spec]
    cfg, _ = load_checkpoint(ck.hf_dir)
    model = tiny_hf_model(spec)
    v = cfg.vision
    per_tile = (v.image_size // v.patch_size) ** 2 // 4
    ids = torch.tensor([[5, 6, 7] + [ck.image_token_id] * per_tile + [8, 9, 10, 11]])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=ids, pixel_values=torch.randn(1, 3, v.image_size, v.image_size), logits_to_keep=1)
    ops = {str(op).split(".")[1]: n for op, n in fc.get_flop_counts()["Global"].items()}
    assert set(ops) <= {"mm", "addmm", "convolution", "bmm"}, ops
    parts = prefill_flop_parts(cfg, 1, ids.shape[1])
    assert parts["vision_matmul"] + parts["projector"] + parts["llm_matmul"] == \
        ops["mm"] + ops.get("addmm", 0) + ops["convolution"]
    # eager attention multiplies the whole square and masks it; our count takes the causal half
    assert parts["vision_attention"] + 2 * parts["llm_attention"] == ops["bmm"]
    assert prefill_flops(cfg, 1, ids.shape[1]) == sum(parts.values())
