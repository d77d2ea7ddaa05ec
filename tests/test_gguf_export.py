"""bench/gguf_export.py: the GGUF file llama.cpp gets holds exactly the artifact's LLM weights.

No compile and no llama.cpp needed: an artifact's weights file is the canonical weights with q/k/v
and gate/up fused (what compile/passes writes), so the test builds one by hand from the demo
checkpoint (InternLM2) and from random weights of the same shapes with a Qwen2 backbone, writes
GGUF files and reads them back with gguf.GGUFReader.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # in the `test` extra; absent only in a bare runtime venv

from internvl_aot.bench import gguf_export  # noqa: E402
from internvl_aot.compile.checkpoint import load_checkpoint, random_weights  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "models" / "internvl-demo"


def fake_artifact(root: Path, cfg, canonical: dict) -> Path:
    """manifest.json + rank0/weights.safetensors laid out as the fusion passes leave them."""
    import re
    from safetensors.torch import save_file
    fused = {}
    for k, t in canonical.items():
        m = re.match(r"(language_model\.layers\.\d+\.)(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.(weight|bias)$", k)
        if not m:
            fused[k] = t.contiguous()
        elif m[2] == "self_attn.q_proj":
            p = m[1] + "self_attn."
            fused[p + f"qkv_proj.{m[4]}"] = torch.cat([canonical[p + f"{c}_proj.{m[4]}"] for c in "qkv"])
        elif m[2] == "mlp.gate_proj":
            fused[m[1] + "mlp.gate_up_proj.weight"] = torch.cat([t, canonical[m[1] + "mlp.up_proj.weight"]])
    fused["language_model.rotary.cos_table"] = torch.zeros(4, 2)  # a derived constant: dropped
    (root / "rank0").mkdir(parents=True)
    save_file(fused, str(root / "rank0" / "weights.safetensors"))
    manifest = {"model": {"name": cfg.name, "config": cfg.to_dict()}, "dtype": "fp32", "tp": 1,
                "ranks": [{"weights": "rank0/weights.safetensors"}], "buckets": {"batch": [1]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def read_back(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    tensors = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (np.asarray(a, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape]))),
                           t.tensor_type)
    fields = {k: f for k, f in r.fields.items()}
    return tensors, fields


def expected(cfg, canonical: dict) -> dict:
    out = {}
    for k, t in canonical.items():
        if not k.startswith("language_model."):
            continue
        out[gguf_export.gguf_name(k)] = (k, t.float().numpy())
    return out


def _check(path, cfg, canonical, qtype):
    tensors, fields = read_back(path)
    want = expected(cfg, canonical)
    assert set(tensors) == set(want)
    assert bytes(fields["general.architecture"].parts[-1]).decode() == gguf_export.ARCHS[cfg.llm.arch]
    assert len(fields["tokenizer.ggml.tokens"].data) == cfg.llm.vocab_size
    assert int(fields[f"{gguf_export.ARCHS[cfg.llm.arch]}.block_count"].parts[-1][0]) == cfg.llm.num_layers
    for name, (key, w) in want.items():
        got, gtype = tensors[name]
        if cfg.llm.arch in gguf_export.PERMUTED_ROPE and (".q_proj." in key or ".k_proj." in key):
            got = gguf_export.unpermute(got, cfg.llm.num_heads if ".q_proj." in key else cfg.llm.num_kv_heads)
        assert got.shape == w.shape, name
        if w.ndim == 1 or qtype == "f32":
            assert gtype == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(got, w, err_msg=name)
        elif qtype == "f16":
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32), err_msg=name)
        elif qtype == "q8_0":  # one f16 scale d = amax / 127 per 32 values: error <= d / 2 + 127 x d's rounding
            assert gtype == gguf.GGMLQuantizationType.Q8_0, name
            amax = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs((got - w).reshape(-1, 32))
            assert (err <= amax * (0.5 / 127 + 2.0 ** -10)).all(), name
        else:  # q4_0: d = (signed max) / -8 per 32 values, levels -8..7: error <= d / 2 inside the levels,
            # up to d for a value of the other sign beyond 7 d (-amax lands on 7 d), plus 8 x d's f16 rounding
            assert qtype == "q4_0" and gtype == gguf.GGMLQuantizationType.Q4_0, name
            amax = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs((got - w).reshape(-1, 32))
            assert (err <= amax * (1 / 8 + 2.0 ** -9)).all(), name
            assert (err > amax * (0.5 / 127 + 2.0 ** -10)).any(), name   # 4 bits, not 8


def test_permute_inverts():
    w = torch.arange(3 * 8 * 5, dtype=torch.float32).reshape(3 * 8, 5)
    assert torch.equal(gguf_export.unpermute(gguf_export.permute(w, 3), 3), w)
    assert not torch.equal(gguf_export.permute(w, 3), w)


def test_internlm2_gguf_equals_the_artifacts_weights(tmp_path):
    cfg, weights = load_checkpoint(DEMO)
    art = fake_artifact(tmp_path / "art", cfg, weights)
    for qtype in ("f32", "f16", "q8_0", "q4_0"):
        info = gguf_export.export(art, tmp_path / f"m-{qtype}.gguf", qtype, log=lambda m: None)
        assert info["arch"] == "internlm2" and info["tensors"] == 3 + 9 * cfg.llm.num_layers
        _check(tmp_path / f"m-{qtype}.gguf", cfg, weights, qtype)


def test_qwen2_gguf_keeps_biases_and_rotate_half_rows(tmp_path):
    cfg, _ = load_checkpoint(DEMO)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, arch="qwen2", qkv_bias=True))
    weights = random_weights(cfg, torch.float32, seed=3)
    art = fake_artifact(tmp_path / "art", cfg, weights)
    gguf_export.export(art, tmp_path / "q.gguf", "f32", log=lambda m: None)
    tensors, _ = read_back(tmp_path / "q.gguf")
    assert "blk.0.attn_q.bias" in tensors
    _check(tmp_path / "q.gguf", cfg, weights, "f32")


def test_unsupported_backbone_is_refused(tmp_path):
    cfg, weights = load_checkpoint(DEMO)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, arch="phi3"))
    art = fake_artifact(tmp_path / "art", cfg, weights)
    with pytest.raises(gguf_export.GGUFExportError, match="phi3"):
        gguf_export.export(art, tmp_path / "p.gguf", "f16", log=lambda m: None)


def test_compare_llamacpp_says_what_is_missing(tmp_path, monkeypatch, capsys):
    """Without llama-cpp-python the benchmark stops at once with the install line (CI never builds it)."""
    import importlib.util
    from internvl_aot.bench import cli
    cfg, weights = load_checkpoint(DEMO)
    art = fake_artifact(tmp_path / "art", cfg, weights)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert cli.main(["--artifact", str(art), "--compare", "llama.cpp", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "llama_cpp not installed" in err and "GGML_NATIVE=ON" in err
    assert "unknown --llamacpp-types" in cli.llamacpp_missing(["q4_k"])
