"""QUANT=int8 end to end: a tiny artifact with int8 LLM weights against transformers holding the same int8-rounded weights.

Weight-only int8 changes the weights, not the arithmetic: transformers' InternVLForConditionalGeneration
with every LLM linear weight replaced by its per-row int8 rounding (q * scale) is the model the int8
artifact must run. In fp32 the greedy tokens must be identical, for an image prompt, two images, text
and a batch of all three (the decode graphs read the int8 bytes; prefill GEMMs go through internvl::linear_fp32_int8
where the box has AVX2 + FMA, else dequantised slices).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compile_tiny
from internvl_aot.compile.passes.int8_weights import quantize
from internvl_aot.runtime.engine import Engine
from test_artifact import _requests
from test_graphs_vs_transformers import hf_greedy

SPEC, FMT = "qwen2_vit300m", "hf"
BUCKETS = "vision=1;prefill=128;batch=1,4;context=2048;block_size=16"


@pytest.fixture(scope="module")
def int8_artifact(tiny_checkpoints, tmp_path_factory):
    return compile_tiny(tiny_checkpoints[SPEC], FMT, tmp_path_factory.mktemp("quant") / "int8", BUCKETS, quant="int8")


def _int8_rounded_hf(tiny_checkpoints):
    hf = tiny_checkpoints[SPEC].load_hf_model()
    lm = hf.model.language_model
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)] + [hf.lm_head]
    with torch.no_grad():
        for m in linears:
            q, s = quantize(m.weight)
            m.weight.copy_(q.float() * s[:, None])
    return hf, len(linears)


def test_int8_artifact_stores_int8_and_equals_transformers_with_int8_weights(int8_artifact, tiny_checkpoints):
    from safetensors import safe_open
    manifest = json.loads((int8_artifact / "manifest.json").read_text())
    assert manifest["compile"]["lowering"]["quant"] == "int8"
    with safe_open(str(int8_artifact / manifest["ranks"][0]["weights"]), "pt") as f:
        keys = list(f.keys())
        int8 = [k for k in keys if f.get_slice(k).get_dtype() == "I8"]
        # every LLM linear is int8 (qkv, o, gate_up, down per layer + the head) and no fp32 copy of one is kept
        llm_fp = [k for k in keys if k.startswith("language_model.") and k.endswith("proj.weight")]
    hf, n_linears = _int8_rounded_hf(tiny_checkpoints)
    layers = hf.config.text_config.num_hidden_layers
    assert len(int8) == 4 * layers + 1 and not llm_fp
    assert n_linears == 7 * layers + 1                 # transformers' unfused q, k, v, o, gate, up, down + head
    engine = Engine.from_artifact(int8_artifact)
    reqs = _requests()
    ours = engine.generate(reqs)                       # one batch: image, two images, text
    for req, a in zip(reqs, ours):
        tiles = engine.make_sequence(req).pixel_values
        assert a.output_token_ids == hf_greedy(hf, a.prompt_token_ids, tiles, 24), req.prompt
    assert max(len(set(r.output_token_ids)) for r in ours) > 3
    # Each alone (batch 1: the one-row int8 reduction) gives the same tokens as in the batch (4 rows).
    for req, a in zip(reqs, ours):
        assert engine.generate([req])[0].output_token_ids == a.output_token_ids


def test_the_bench_runs_transformers_on_the_int8_rounded_weights(int8_artifact, tiny_checkpoints):
    """internvl-bench --compare transformers on a QUANT=int8 artifact (bench/hf_weights.py `dequantized`): every int8
    matrix with its scales becomes the fp32 weight q * scale, i.e. the checkpoint's weights rounded as int8_weights
    rounds them (per output row, so fusing q/k/v or gate/up rounds each part alike); nothing int8 is left."""
    from internvl_aot.bench.hf_weights import dequantized
    from internvl_aot.compile.checkpoint import load_checkpoint
    from internvl_aot.runtime import weights_file
    from conftest import checkpoint_dir
    manifest = json.loads((int8_artifact / "manifest.json").read_text())
    deq = dequantized(weights_file.read(int8_artifact / manifest["ranks"][0]["weights"]))
    assert not [k for k in deq if ".weight_int8" in k or ".weight_scale" in k]
    _, want = load_checkpoint(checkpoint_dir(tiny_checkpoints[SPEC], FMT))

    def rounded(*names):
        return torch.cat([(lambda q, s: q.float() * s[:, None])(*quantize(want[n])) for n in names])
    layers = tiny_checkpoints[SPEC].load_hf_model().config.text_config.num_hidden_layers
    for i in range(layers):
        pre = f"language_model.layers.{i}."
        assert torch.equal(deq[pre + "self_attn.qkv_proj.weight"],
                           rounded(*(pre + f"self_attn.{n}_proj.weight" for n in "qkv")))
        assert torch.equal(deq[pre + "self_attn.o_proj.weight"], rounded(pre + "self_attn.o_proj.weight"))
        assert torch.equal(deq[pre + "mlp.gate_up_proj.weight"], rounded(pre + "mlp.gate_proj.weight",
                                                                          pre + "mlp.up_proj.weight"))
        assert torch.equal(deq[pre + "mlp.down_proj.weight"], rounded(pre + "mlp.down_proj.weight"))
        assert torch.equal(deq[pre + "self_attn.qkv_proj.bias"].float(),       # biases stay as stored
                           torch.cat([want[pre + f"self_attn.{n}_proj.bias"] for n in "qkv"]).float())
    assert torch.equal(deq["language_model.lm_head.weight"], rounded("language_model.lm_head.weight"))
