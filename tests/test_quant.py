"""QUANT=int8 end to end: a tiny artifact with int8 LLM weights against transformers holding the same int8-rounded weights.

Weight-only int8 changes the weights, not the arithmetic: transformers' InternVLForConditionalGeneration
with every LLM linear weight replaced by its per-row int8 rounding (q * scale) is the model the int8
artifact must run. In fp32 the greedy tokens must be identical, for an image prompt, two images, text
and a batch of all three (the decode graphs read the int8 bytes; prefill GEMMs dequantise slices).
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
