"""compile/passes: each fusion pass alone and all together on tiny exported InternVL graphs.

For each pass: (a) the passed program computes what the exported one does (logits and the
in-place KV-cache writes, with a non-trivial cache, block tables and positions), (b) the
pattern it targets is gone and its new inputs exist, (c) graphs of different buckets get
the same fused weights / RoPE tables under the same names. One passed decode graph goes
through AOTInductor and the runtime loader to show the result still lowers and binds.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from internvl_aot.compile import aoti
from internvl_aot.compile.buckets import Buckets
from internvl_aot.compile.checkpoint import random_weights
from internvl_aot.compile.export import export_graph
from internvl_aot.compile.passes import PASS_ORDER, add_rmsnorm, count_ops, rope_table, run_passes
from internvl_aot.graphs.config import LLMConfig, ModelConfig, VisionConfig
from internvl_aot.graphs.model import build_model

BLOCK = 16
BUCKETS = Buckets(vision=(1,), prefill=(16,), batch=(2,), context=(32, 64), block_size=BLOCK)
GRAPHS = ("prefill_t16_c64", "decode_b2_c64", "decode_b2_c32", "decode_b1_c32")
NUM_BLOCKS = 10          # != the export example's 8: the pool size is a dynamic dimension
LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB = 2, 4, 2, 16, 64, 128
aten = torch.ops.aten


def tiny_config(arch: str, vit: str = "300m") -> ModelConfig:
    vision = VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          norm_type="rms_norm" if vit == "6b" else "layer_norm", qkv_bias=vit != "6b",
                          qk_normalization=vit == "6b")
    llm = LLMConfig(arch=arch, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                    num_kv_heads=KV_HEADS, intermediate_size=96, qkv_bias=arch == "qwen2",
                    rope_theta=10000.0, rms_norm_eps=1e-6)
    return ModelConfig(name=f"tiny-{arch}", vision=vision, llm=llm)


_CACHE: dict = {}


def programs(arch: str, dtype=torch.float32) -> dict:
    """Exported (unpassed) prefill/decode programs of one tiny model, built once per session."""
    key = (arch, dtype)
    if key not in _CACHE:
        cfg = tiny_config(arch)
        model = build_model(cfg, random_weights(cfg, dtype, seed=3), max_seq_len=BUCKETS.max_context)
        _CACHE[key] = {name: export_graph(model, BUCKETS, name, dtype, "cpu") for name in GRAPHS}
    return _CACHE[key]


def graph_inputs(name: str, dtype, seed: int = 0) -> list[torch.Tensor]:
    """A mid-sequence state: random cache contents, scattered blocks, padded rows/tokens."""
    g = torch.Generator().manual_seed(seed)
    pool = (LAYERS, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
    k, v = torch.randn(pool, generator=g).to(dtype), torch.randn(pool, generator=g).to(dtype)

    def slot(table, p):
        return int(table[p // BLOCK]) * BLOCK + p % BLOCK

    if name.startswith("decode"):
        width = int(name.rsplit("_c", 1)[1]) // BLOCK
        tables = torch.zeros(2, width, dtype=torch.long)
        tables[0, :width] = torch.tensor([3, 7, 1, 5][:width])
        tables[1, :1] = 2
        positions = torch.tensor([width * BLOCK - 3, 9])
        slots = torch.tensor([slot(tables[0], int(positions[0])), slot(tables[1], 9)])
        b = int(name[len("decode_b"):].split("_c")[0])         # 1: the first row only
        return [torch.randint(0, VOCAB, (2,), generator=g)[:b], positions[:b], slots[:b], tables[:b], k, v]
    t, real = 16, 12                                  # second chunk of a 28-token prompt, 4 pad tokens
    table = torch.tensor([[4, 6, 0, 0]])
    positions = torch.cat([torch.arange(16, 16 + real), torch.zeros(t - real, dtype=torch.long)])
    slots = torch.tensor([slot(table[0], int(p)) for p in positions[:real]] + list(range(t - real)))
    image_mask = torch.zeros(t, dtype=torch.bool)
    image_mask[2:7] = True
    return [torch.randint(0, VOCAB, (t,), generator=g), positions, torch.randn(t, HIDDEN, generator=g).to(dtype),
            image_mask, slots, table, torch.tensor([real - 1]), k, v]


def run(ep, inputs):
    inputs = [x.clone() for x in inputs]
    with torch.no_grad():
        out = ep.module()(*inputs)
    return out, inputs[-2], inputs[-1]


def assert_same_results(ep_ref, ep_new, name, dtype, atol, rtol):
    inputs = graph_inputs(name, dtype)
    ref, new = run(ep_ref, inputs), run(ep_new, inputs)
    for what, a, b in zip(("logits", "k_cache", "v_cache"), ref, new):
        torch.testing.assert_close(b.float(), a.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name} {what}: {m}")
    # The step wrote its K/V: the cache differs from the input somewhere.
    assert not torch.equal(ref[1], inputs[-2])


def linear_weight_names(ep) -> list[str]:
    specs = {s.arg.name: s.target for s in ep.graph_signature.input_specs}
    return [specs.get(n.args[1].name) for n in ep.graph.nodes if n.op == "call_function"
            and n.target is aten.linear.default]


def count_targets(ep, *targets) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target in targets)


# ---------------------------------------------------------------- (a) numerics, each pass and all

@pytest.mark.parametrize("arch", ["qwen2", "llama"])
# small_m_linear and fp32_gemm leave fp32 graphs alone (their own tests below cover bf16).
@pytest.mark.parametrize("passes", [[p] for p in PASS_ORDER if p not in ("small_m_linear", "fp32_gemm")] + [PASS_ORDER],
                         ids=lambda p: "+".join(p))
def test_passes_keep_numerics_fp32(arch, passes):
    for name, ep in programs(arch).items():
        new, reports = run_passes(ep, passes)
        assert new is not ep
        for p in passes:
            assert reports[p]["ops"][1] <= reports[p]["ops"][0] + 8, reports  # nothing balloons
        assert_same_results(ep, new, name, torch.float32, atol=1e-5, rtol=1e-5)


def test_all_passes_bf16_within_tolerance():
    for name, ep in programs("qwen2", torch.bfloat16).items():
        new, _ = run_passes(ep)
        # add_rmsnorm rounds the normalised output once instead of twice: ~1 bf16 ulp.
        assert_same_results(ep, new, name, torch.bfloat16, atol=6e-2, rtol=2e-2)


def test_input_program_is_not_modified():
    ep = programs("qwen2")["decode_b2_c64"]
    nodes, params = len(ep.graph.nodes), sorted(ep.state_dict)
    run_passes(ep)
    assert len(ep.graph.nodes) == nodes and sorted(ep.state_dict) == params


# ---------------------------------------------------------------- (b) patterns gone, new inputs present

@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_qkv_and_gate_up_fusion_relayout_weights(arch):
    ep = programs(arch)["decode_b2_c64"]
    new, reports = run_passes(ep, ["qkv_fusion", "gate_up_fusion"])
    assert reports["qkv_fusion"]["fused"] == LAYERS and reports["gate_up_fusion"]["fused"] == LAYERS
    names = linear_weight_names(new)
    for old in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert not any(f".{old}." in n for n in names), names
        assert not any(f".{old}." in k for k in new.state_dict)
    # qkv, o, gate_up, down per layer + lm_head, instead of q, k, v, o, gate, up, down + lm_head
    assert count_targets(new, aten.linear.default) == 4 * LAYERS + 1
    assert count_targets(ep, aten.linear.default) == 7 * LAYERS + 1
    sd = ep.state_dict
    for i in range(LAYERS):
        p = f"language_model.layers.{i}."
        qkv = new.state_dict[p + "self_attn.qkv_proj.weight"]
        assert isinstance(qkv, torch.nn.Parameter)
        assert qkv.shape == ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        torch.testing.assert_close(qkv, torch.cat([sd[p + f"self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]),
                                   atol=0, rtol=0)
        if arch == "qwen2":
            torch.testing.assert_close(new.state_dict[p + "self_attn.qkv_proj.bias"],
                                       torch.cat([sd[p + f"self_attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")]),
                                       atol=0, rtol=0)
        else:
            assert p + "self_attn.qkv_proj.bias" not in new.state_dict
        torch.testing.assert_close(new.state_dict[p + "mlp.gate_up_proj.weight"],
                                   torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
                                   atol=0, rtol=0)
    kinds = {s.target: s.kind.name for s in new.graph_signature.input_specs if s.target}
    assert kinds["language_model.layers.0.self_attn.qkv_proj.weight"] == "PARAMETER"
    assert kinds["language_model.layers.1.mlp.gate_up_proj.weight"] == "PARAMETER"


def test_add_rmsnorm_pattern_gone():
    ep = programs("qwen2")["decode_b2_c64"]
    # Every norm after a residual add: post-attention of each layer, input norm of layers 1.. .
    assert add_rmsnorm.count(ep) == 2 * LAYERS - 1
    new, reports = run_passes(ep, ["add_rmsnorm"])
    assert reports["add_rmsnorm"]["fused"] == 2 * LAYERS - 1
    assert add_rmsnorm.count(new) == 0
    # The pow(x, 2) of the fused norms is gone; the two norms without a preceding add stay.
    assert count_targets(ep, aten.pow.Tensor_Scalar) == 2 * LAYERS + 1
    assert count_targets(new, aten.pow.Tensor_Scalar) == 2
    assert reports["add_rmsnorm"]["norms_left"] == 2


def test_add_rmsnorm_in_vit_6b():
    """InternViT-6B's `x + attn(norm1(x)) * ls1; norm2(x)` is the same pattern (and so is the
    embeddings' `+ position_embedding` before the first norm1); 300M uses LayerNorm."""
    cfg = tiny_config("llama", vit="6b")
    model = build_model(cfg, random_weights(cfg, torch.float32, seed=5), max_seq_len=BUCKETS.max_context)
    ep = export_graph(model, BUCKETS, "vision_n1", torch.float32, "cpu")
    assert add_rmsnorm.count(ep) == 2 * cfg.vision.num_layers
    new, reports = run_passes(ep)
    assert reports["add_rmsnorm"]["fused"] == 2 * cfg.vision.num_layers
    for p in ("qkv_fusion", "gate_up_fusion", "rope_table"):   # ViT qkv is fused already; no RoPE
        assert reports[p].get("fused", reports[p].get("replaced")) == 0
    assert add_rmsnorm.count(new) == 0
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(new.module()(pixels), ep.module()(pixels), atol=1e-5, rtol=1e-5)


def test_rope_table_replaces_trigonometry():
    ep = programs("qwen2")["decode_b2_c64"]
    assert rope_table.count(ep) == 2
    new, reports = run_passes(ep, ["rope_table"])
    assert reports["rope_table"]["max_context"] == 64
    assert rope_table.count(new) == 0
    assert count_targets(new, aten.cos.default, aten.sin.default) == 0
    assert count_targets(new, aten.index_select.default) == 2
    specs = {s.target: s for s in new.graph_signature.input_specs if s.target}
    assert "language_model.rotary.inv_freq" not in specs and "language_model.rotary.inv_freq" not in new.constants
    inv = ep.constants["language_model.rotary.inv_freq"]
    for kind, fn in (("cos", torch.cos), ("sin", torch.sin)):
        fqn = f"language_model.rotary.{kind}_table"
        assert specs[fqn].kind.name == "BUFFER" and specs[fqn].persistent is False
        table = new.constants[fqn]
        assert fqn not in new.state_dict and table.shape == (64, HEAD_DIM) and table.dtype == torch.float32
        freqs = torch.arange(64).float()[:, None] * inv[None, :]
        torch.testing.assert_close(table, fn(torch.cat([freqs, freqs], -1)), atol=0, rtol=0)


def test_rope_table_in_model_dtype():
    ep = programs("qwen2", torch.bfloat16)["prefill_t16_c64"]
    new, _ = run_passes(ep, ["rope_table"])
    assert new.constants["language_model.rotary.cos_table"].dtype == torch.bfloat16


# ---------------------------------------------------------------- (c) same keys, same content across graphs

def test_graphs_share_fused_weights_and_tables():
    passed = {name: run_passes(ep)[0] for name, ep in programs("qwen2").items()}
    prefill, dec64, dec32 = (passed[n] for n in GRAPHS[:3])
    fused = [k for k in prefill.state_dict if "qkv_proj" in k or "gate_up_proj" in k]
    assert len(fused) == 3 * LAYERS       # qkv weight + bias, gate_up weight
    assert sorted(prefill.state_dict) == sorted(dec64.state_dict) == sorted(dec32.state_dict)
    for k in prefill.state_dict:
        a, b, c = prefill.state_dict[k], dec64.state_dict[k], dec32.state_dict[k]
        assert torch.equal(a, b) and torch.equal(a, c)
        assert a.data_ptr() == b.data_ptr() == c.data_ptr()   # one tensor in memory, not one per graph
    # Prefill and decode at the largest context: identical tables, so one artifact key.
    for kind in ("cos", "sin"):
        fqn = f"language_model.rotary.{kind}_table"
        assert torch.equal(prefill.constants[fqn], dec64.constants[fqn])
        assert aoti._digest(prefill.constants[fqn]) == aoti._digest(dec64.constants[fqn])
        # The smaller context bucket gets the leading rows of the same table.
        assert dec32.constants[fqn].shape[0] == 32
        assert torch.equal(dec32.constants[fqn], dec64.constants[fqn][:32])


# ---------------------------------------------------------------- AOTInductor lowering + binding

def test_passed_decode_graph_compiles_and_binds(tmp_path):
    from internvl_aot.compile.artifact import collect_weights
    from internvl_aot.runtime.graph_loader import load_graph, load_weights

    name = "decode_b2_c64"
    ep = programs("qwen2")[name]
    passed, _ = run_passes(ep)
    compiled = aoti.compile_graphs({name: passed}, tmp_path / "graphs")
    keys = compiled[name].constants
    assert "language_model.layers.0.self_attn.qkv_proj.weight" in keys.values()
    assert "language_model.layers.1.mlp.gate_up_proj.weight" in keys.values()
    assert not any(".q_proj." in k or ".gate_proj." in k for k in keys.values())
    tables = [k for k in keys.values() if k.startswith("_aoti.language_model.rotary.")]
    assert sorted(t.split(".")[-2] for t in tables) == ["cos_table", "sin_table"], keys
    weights = collect_weights({name: passed}, compiled)
    save_file(weights, str(tmp_path / "weights.safetensors"))
    graph = load_graph(tmp_path / "graphs" / compiled[name].package, load_weights(tmp_path / "weights.safetensors"))
    inputs = graph_inputs(name, torch.float32, seed=7)
    want_logits, want_k, want_v = run(ep, inputs)
    got = [x.clone() for x in inputs]
    logits = graph(*got)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[-2], want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[-1], want_v, atol=1e-5, rtol=1e-5)
    assert count_ops(passed) < count_ops(ep)


# ---------------------------------------------------------------- small-M linear lowering

BEFORE_GEMV = [p for p in PASS_ORDER if p not in ("small_m_linear", "fp32_gemm")]


REDUCE = {"small_m_linear": {"kernel": False}}     # Inductor's reduction, not the kernel library


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_small_m_linear_lowers_one_row_linears_only(arch):
    progs = programs(arch, torch.bfloat16)
    dec, _ = run_passes(progs["decode_b1_c32"], BEFORE_GEMV)
    low, report = run_passes(dec, ["small_m_linear"], REDUCE)
    assert report["small_m_linear"]["lowered"] == count_targets(dec, aten.linear.default) > 0
    assert count_targets(low, aten.linear.default) == 0
    assert_same_results(dec, low, "decode_b1_c32", torch.bfloat16, atol=0.05, rtol=0.02)
    # K split into chunks (as for K > 4,096 on real models): the same result.
    split, report = run_passes(dec, ["small_m_linear"], {"small_m_linear": {"max_chunk": 32, "kernel": False}})
    assert count_targets(split, aten.linear.default) == 0
    assert_same_results(low, split, "decode_b1_c32", torch.bfloat16, atol=0.03, rtol=0.02)
    # Two rows: the GEMM is faster there; nothing is lowered.
    dec2, _ = run_passes(progs["decode_b2_c64"], BEFORE_GEMV)
    assert run_passes(dec2, ["small_m_linear"], REDUCE)[1]["small_m_linear"]["lowered"] == 0
    pre, _ = run_passes(progs["prefill_t16_c64"], BEFORE_GEMV)
    low_pre, report = run_passes(pre, ["small_m_linear"], REDUCE)
    # 16 token rows: the layers keep their GEMMs; only the output head runs on one row.
    assert report["small_m_linear"]["lowered"] == 1
    assert count_targets(low_pre, aten.linear.default) == count_targets(pre, aten.linear.default) - 1
    assert_same_results(pre, low_pre, "prefill_t16_c64", torch.bfloat16, atol=0.05, rtol=0.02)
    fp32 = programs(arch, torch.float32)["decode_b2_c64"]
    kept, report = run_passes(fp32, ["small_m_linear"])
    assert report["small_m_linear"]["lowered"] == 0                      # fp32 keeps MKL's GEMV


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_small_m_linear_calls_the_kernel_library_up_to_8_rows(arch):
    """kernel=True: bf16 linears of <= 8 rows call internvl::small_m_linear (kernels/small_m_gemm.cpp: its
    vdpbf16ps path where this box has AVX512-BF16, its plain loop elsewhere); the results are the GEMM's."""
    progs = programs(arch, torch.bfloat16)
    for name, lowered_all in (("decode_b1_c32", True), ("decode_b2_c64", True), ("prefill_t16_c64", False)):
        ep, _ = run_passes(progs[name], BEFORE_GEMV)
        low, report = run_passes(ep, ["small_m_linear"], {"small_m_linear": {"kernel": True}})
        op = torch.ops.internvl.small_m_linear.default
        n_lin = count_targets(ep, aten.linear.default)
        # decode: every linear (qwen2's q/k/v biases too); prefill (16 rows): only the one-row output head
        assert report["small_m_linear"]["kernel"] == (n_lin if lowered_all else 1) == count_targets(low, op) > 0
        assert count_targets(low, aten.linear.default) == (0 if lowered_all else n_lin - 1)
        assert_same_results(ep, low, name, torch.bfloat16, atol=0.05, rtol=0.02)
    # The target decides by default: x86-64-v3 (AVX2 + FMA, no AVX512-BF16: its fp32 FMA loop) and AVX512-BF16
    # targets call the kernel from one row; a target with neither keeps Inductor's reduction and the GEMM.
    from internvl_aot.compile import targets
    from internvl_aot.runtime.isa import get_target
    one, _ = run_passes(progs["decode_b1_c32"], BEFORE_GEMV)
    two, _ = run_passes(progs["decode_b2_c64"], BEFORE_GEMV)
    for name in ("x86-64-v3", "x86-64-v4-bf16"):
        with targets.activate(get_target(name)):
            assert run_passes(one, ["small_m_linear"])[1]["small_m_linear"]["kernel"] > 0
            assert run_passes(two, ["small_m_linear"])[1]["small_m_linear"]["kernel"] > 0
    from internvl_aot.runtime.isa import native_target
    with targets.activate(native_target(["sse4_2", "avx"])):
        assert run_passes(one, ["small_m_linear"])[1]["small_m_linear"]["kernel"] == 0
        assert run_passes(two, ["small_m_linear"])[1]["small_m_linear"]["kernel"] == 0
    # An AMX box keeps the lowerings measured there (oneDNN at the bandwidth): no kernel.
    from internvl_aot.runtime.isa import native_target
    with targets.activate(native_target(["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"])):
        assert run_passes(two, ["small_m_linear"])[1]["small_m_linear"]["kernel"] == 0



# ---------------------------------------------------------------- fp32 compute for targets without native bf16

def _low_precision_gemm_inputs(ep) -> int:
    """GEMM-class nodes (linear over 2+ rows, conv2d, SDPA) that still take a bf16/fp16 tensor."""
    from internvl_aot.compile.passes import fp32_gemm
    bad = 0
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target in fp32_gemm.GEMM_OPS and fp32_gemm._rows(n) >= 2:
            bad += any(getattr(a.meta.get("val"), "dtype", None) in (torch.bfloat16, torch.float16)
                       for a in n.all_input_nodes)
    return bad


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fp32_gemm_widens_gemms_for_targets_without_native_bf16(arch):
    from internvl_aot.compile import targets
    from internvl_aot.runtime.isa import get_target
    progs = programs(arch, torch.bfloat16)
    for name in ("prefill_t16_c64", "decode_b2_c64"):
        ep, _ = run_passes(progs[name], BEFORE_GEMV + ["small_m_linear"], REDUCE)
        assert _low_precision_gemm_inputs(ep) > 0
        opts = {"fp32_gemm": {"min_rows": 2, "kernel": False}}
        # The native target (this box, or any with AVX512-BF16/AMX) keeps bf16 GEMMs: the program is returned as is.
        kept, report = run_passes(ep, ["fp32_gemm"], {"fp32_gemm": {"native_bf16": True, "min_rows": 2}})
        assert kept is ep and report["fp32_gemm"]["lowered"] == 0
        # The default follows the compile target: x86-64-v3 (AVX2, no native bf16) widens every GEMM.
        with targets.activate(get_target("x86-64-v3")):
            wide, report = run_passes(ep, ["fp32_gemm"], opts)
            # The default min_rows (48) keeps the linears of these few-row graphs (decode batches: the converted
            # copy would cost more than it saves); a prefill chunk's attention is widened at any length, and its
            # linears (16 rows) call the fp32 GEMM kernel (x86-64-v3 has it), a decode batch's (2 rows) do not.
            by_default, report_default = run_passes(ep, ["fp32_gemm"])
            assert report_default["fp32_gemm"]["lowered"] == count_targets(ep, aten.scaled_dot_product_attention.default)
            n_linears = count_targets(ep, aten.linear.default)
            assert report_default["fp32_gemm"]["kernel"] == (n_linears if name.startswith("prefill") else 0)
            assert count_targets(by_default, torch.ops.internvl.linear_fp32.default) == report_default["fp32_gemm"]["kernel"]
            if name.startswith("prefill"):
                assert n_linears > 0 and count_targets(by_default, aten.linear.default) == 0
                # the kernel computes in fp32 from the bf16 weights: the results within bf16 rounding
                assert_same_results(ep, by_default, name, torch.bfloat16, atol=6e-2, rtol=2e-2)
        assert report["fp32_gemm"]["native_bf16"] is False and report["fp32_gemm"]["lowered"] > 0
        assert _low_precision_gemm_inputs(wide) == 0
        # Weights and the KV pool keep their bf16 inputs (one stored copy): only the arithmetic widened.
        assert sorted(wide.state_dict) == sorted(ep.state_dict)
        assert all(t.dtype == torch.bfloat16 for t in wide.state_dict.values() if t.is_floating_point())
        # Same results within bf16 rounding (the activations between ops are still rounded to bf16).
        assert_same_results(ep, wide, name, torch.bfloat16, atol=6e-2, rtol=2e-2)
        # The weight converted and multiplied in slices of output rows (as the real model's large matrices are).
        sliced, report = run_passes(ep, ["fp32_gemm"], {"fp32_gemm": {"native_bf16": False, "min_rows": 2,
                                                                      "chunk_mb": 0.002, "kernel": False}})
        assert count_targets(sliced, aten.linear.default) > count_targets(wide, aten.linear.default)
        assert count_targets(sliced, aten.cat.default) > 0
        assert_same_results(wide, sliced, name, torch.bfloat16, atol=2e-2, rtol=1e-2)


# ---------------------------------------------------------------- weight-only int8

def _dequantized_programs(arch: str, group: int | None = None, dtype=torch.float32) -> dict:
    """The fp32 programs of a model whose LLM linear weights are already int8-rounded (q * scale), or, with
    `group`, int4-rounded in groups of `group` where K allows (int4_weights' quantize / dequantize): what a
    quantised program must compute, up to fp32 summation order (in `dtype`: the rounded weights cast to it)."""
    from internvl_aot.compile.passes import int4_weights
    from internvl_aot.compile.passes.int8_weights import quantize
    key = (arch, "dequantized", group, dtype)
    if key not in _CACHE:
        cfg = tiny_config(arch)
        # from the weights the quantised programs start from (programs(arch, dtype)): at 7 levels a group, one
        # value rounded the other way moves a weight by 1/7 of its group's largest
        weights = random_weights(cfg, dtype, seed=3)
        for name, w in weights.items():
            if name.startswith("language_model.") and name.endswith(".weight") and w.dim() == 2 \
                    and "embed_tokens" not in name:
                if group is None:
                    q, s = quantize(w)
                    weights[name] = q.float() * s[:, None]
                elif w.shape[1] % group == 0:
                    weights[name] = int4_weights.dequantize(*int4_weights.quantize(w, group), group)
        weights = {k: t.to(dtype) for k, t in weights.items()}
        model = build_model(cfg, weights, max_seq_len=BUCKETS.max_context)
        _CACHE[key] = {name: export_graph(model, BUCKETS, name, dtype, "cpu") for name in GRAPHS}
    return _CACHE[key]


def test_int8_quantize_is_symmetric_per_output_channel():
    from internvl_aot.compile.passes.int8_weights import quantize
    w = torch.randn(6, 40) * torch.tensor([1e-3, 0.1, 1, 10, 100, 0.0])[:, None]
    q, s = quantize(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6,)
    assert int(q.abs().max()) == 127 and bool((q[:5].abs().amax(1) == 127).all())   # every live row uses the range
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-12).all())                                # round to nearest
    assert torch.equal(q[5], torch.zeros(40, dtype=torch.int8))                      # an all-zero row stays zero


@pytest.mark.parametrize("arch,dtype", [("qwen2", torch.bfloat16), ("llama", torch.float32)],
                         ids=["qwen2-bf16", "llama-fp32"])
def test_int8_weights_decode_reads_int8_and_matches_dequantized_weights(arch, dtype):
    """The lowerings other than the kernel library's (targets without it; the kernel: the test below)."""
    from internvl_aot.compile.passes import pass_list
    names = pass_list(None, "int8")
    assert names.index("int8_weights") == names.index("small_m_linear") - 1
    progs, ref = programs(arch, dtype), _dequantized_programs(arch)

    def opts(**kw):
        return {"int8_weights": {"kernel": False, **kw}}
    passed = {}
    for name in GRAPHS:
        new, reports = run_passes(progs[name], names, opts())
        passed[name] = new
        # per layer: qkv, o, gate_up, down (fused by the passes before), plus the output head
        assert reports["int8_weights"]["quantized"] == 4 * LAYERS + 1
        # Every LLM linear weight is stored as int8 + fp32 scales; no bf16/fp32 copy of it is left.
        q = {k: t for k, t in new.state_dict.items() if k.endswith(".weight_int8")}
        assert q and all(t.dtype == torch.int8 for t in q.values())
        assert not [k for k, t in new.state_dict.items() if t.dim() == 2 and t.is_floating_point()
                    and "embed_tokens" not in k]
        # Batch-1 decode: every linear lowered to a reduction over the int8 bytes (no dequantised matrix is
        # written); 2+ rows (decode batches, the prefill chunk): GEMMs over dequantised slices; the prefill head
        # (one row) a reduction.
        if name == "decode_b1_c32":
            assert count_targets(new, aten.linear.default) == 0
            assert reports["small_m_linear"]["int8"] == reports["int8_weights"]["quantized"]
        elif name.startswith("decode"):      # 2 rows: ATen's int8 GEMM where it may run in x's dtype, else slices
            r = reports["int8_weights"]
            assert r["gemm_sliced"] + r["int8pack"] == 4 * LAYERS + 1 and reports["small_m_linear"]["int8"] == 0
        else:
            assert reports["int8_weights"]["gemm_sliced"] == 4 * LAYERS and reports["small_m_linear"]["int8"] == 1
        expect, _, _ = run(ref[name], graph_inputs(name, torch.float32))
        inputs = graph_inputs(name, dtype)
        got, k, v = run(new, inputs)
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
        torch.testing.assert_close(got.float(), expect, **tol, msg=lambda m: f"{name}: {m}")
    # The prefill chunk's GEMMs dequantise slices of output rows (as the real model's large matrices do).
    sliced, reports = run_passes(progs["prefill_t16_c64"], names, opts(chunk_mb=0.002))
    assert reports["int8_weights"]["gemm_sliced"] == 4 * LAYERS and count_targets(sliced, aten.cat.default) > 0
    got, _, _ = run(sliced, graph_inputs("prefill_t16_c64", dtype))
    expect, _, _ = run(ref["prefill_t16_c64"], graph_inputs("prefill_t16_c64", torch.float32))
    torch.testing.assert_close(got.float(), expect, **tol)
    # A native-bf16 target: 2-row bf16 decode through ATen's weight-only int8 GEMM, reading the int8 matrix;
    # fp32 activations never (that kernel has no vector path for them), nor without native bf16.
    packed, reports = run_passes(progs["decode_b2_c64"], names, opts(native_bf16=True))
    n_packed = 4 * LAYERS + 1 if dtype == torch.bfloat16 else 0
    assert reports["int8_weights"]["int8pack"] == count_targets(packed, aten._weight_int8pack_mm.default) == n_packed
    _, off = run_passes(progs["decode_b2_c64"], names, opts(native_bf16=False))
    assert off["int8_weights"]["int8pack"] == 0
    got, _, _ = run(packed, graph_inputs("decode_b2_c64", dtype))
    expect, _, _ = run(ref["decode_b2_c64"], graph_inputs("decode_b2_c64", torch.float32))
    torch.testing.assert_close(got.float(), expect, **tol)
    # A target without native bf16: the sliced GEMMs of a bf16 graph dequantise to fp32 and compute in fp32.
    if dtype == torch.bfloat16:
        wide, reports = run_passes(progs["decode_b2_c64"], names, opts(native_bf16=False))
        assert _low_precision_gemm_inputs(wide) == 0 and reports["int8_weights"]["gemm_sliced"] > 0
        got, _, _ = run(wide, graph_inputs("decode_b2_c64", dtype))
        expect, _, _ = run(ref["decode_b2_c64"], graph_inputs("decode_b2_c64", torch.float32))
        torch.testing.assert_close(got.float(), expect, **tol)
    # One quantised tensor for all graphs: the artifact stores it once.
    key = next(k for k in passed["decode_b1_c32"].state_dict if k.endswith("gate_up_proj.weight_int8"))
    assert passed["decode_b1_c32"].state_dict[key] is passed["prefill_t16_c64"].state_dict[key]
    # The quantisation error itself is small against the unquantised program (per-row int8: ~0.4% of a row's max).
    full, _, _ = run(programs(arch, torch.float32)["decode_b2_c64"], graph_inputs("decode_b2_c64", torch.float32))
    quant, _, _ = run(_dequantized_programs(arch)["decode_b2_c64"], graph_inputs("decode_b2_c64", torch.float32))
    assert torch.nn.functional.cosine_similarity(full.flatten(), quant.flatten(), dim=0) > 0.999


def test_int8_weights_call_the_int8_kernel_up_to_8_rows():
    """kernel=True: bf16 int8 linears of <= 8 rows call internvl::small_m_linear_int8 with the int8 matrix and its
    fp32 scales (its VBMI/AVX512-BF16 path on a box that has them, its plain loop elsewhere); the results are
    the dequantised weights' GEMM. The target decides by default: the kernel from 1 row with AVX512-BF16 or
    AVX2 + FMA, never on an AMX box or without AVX2."""
    from internvl_aot.compile import targets
    from internvl_aot.compile.passes import pass_list
    from internvl_aot.runtime.isa import get_target, native_target
    names = pass_list(None, "int8")
    progs, ref = programs("qwen2", torch.bfloat16), _dequantized_programs("qwen2")
    for name, rows in (("decode_b1_c32", 1), ("decode_b2_c64", 2), ("prefill_t16_c64", 16)):
        new, reports = run_passes(progs[name], names, {"int8_weights": {"kernel": True, "native_bf16": True}})
        op = torch.ops.internvl.small_m_linear_int8.default          # registered by the pass (kernels.ensure_built)
        r = reports["int8_weights"]
        n_kernel = 4 * LAYERS + 1 if rows <= 8 else 1                 # prefill: only its one-row output head
        assert r["kernel"] == count_targets(new, op) == n_kernel and r["quantized"] == 4 * LAYERS + 1
        assert r["gemm_sliced"] == (0 if rows <= 8 else 4 * LAYERS) and r["int8pack"] == 0
        assert reports["small_m_linear"]["int8"] == 0                # nothing left for the reduction
        for node in new.graph.nodes:                                   # the int8 matrix and fp32 scales, as stored
            if node.target is op:
                assert node.args[1].meta["val"].dtype == torch.int8 and node.args[2].meta["val"].dtype == torch.float32
        expect, _, _ = run(ref[name], graph_inputs(name, torch.float32))
        got, _, _ = run(new, graph_inputs(name, torch.bfloat16))
        torch.testing.assert_close(got.float(), expect, atol=0.1, rtol=0.05, msg=lambda m: f"{name}: {m}")
    # Without native bf16 the prefill chunk's int8 linears (16 rows) call internvl::linear_fp32_int8 instead of the
    # dequantised slices: fp32 products of the int8 weights, bf16 out.
    new, reports = run_passes(progs["prefill_t16_c64"], names, {"int8_weights": {"kernel": True, "native_bf16": False}})
    r = reports["int8_weights"]
    assert r["gemm_kernel"] == count_targets(new, torch.ops.internvl.linear_fp32_int8.default) == 4 * LAYERS
    assert r["gemm_sliced"] == 0 and r["kernel"] == 1
    expect, _, _ = run(ref["prefill_t16_c64"], graph_inputs("prefill_t16_c64", torch.float32))
    got, _, _ = run(new, graph_inputs("prefill_t16_c64", torch.bfloat16))
    torch.testing.assert_close(got.float(), expect, atol=0.1, rtol=0.05)
    two = progs["decode_b2_c64"]
    for target, used in ((get_target("x86-64-v3"), True), (get_target("x86-64-v4-bf16"), True),
                         (native_target(["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]), False),
                         (native_target(["sse2", "avx"]), False)):
        with targets.activate(target):
            assert (run_passes(two, names)[1]["int8_weights"]["kernel"] > 0) == used, target.name
    # fp32 activations: one row the reduction over the int8 bytes (the small-M kernel takes bf16 x), 2+ rows (decode
    # batches, the prefill chunk) internvl::linear_fp32_int8 on any target, native bf16 or not
    fp32 = programs("qwen2", torch.float32)
    for name, n_gemm, n_reduced in (("decode_b1_c32", 0, 4 * LAYERS + 1), ("decode_b2_c64", 4 * LAYERS + 1, 0),
                                    ("prefill_t16_c64", 4 * LAYERS, 1)):
        for native in (True, False):
            new, reports = run_passes(fp32[name], names, {"int8_weights": {"kernel": True, "native_bf16": native}})
            r = reports["int8_weights"]
            assert r["kernel"] == 0 and reports["small_m_linear"]["int8"] == n_reduced
            assert r["gemm_kernel"] == count_targets(new, torch.ops.internvl.linear_fp32_int8.default) == n_gemm
            expect, _, _ = run(ref[name], graph_inputs(name, torch.float32))
            got, _, _ = run(new, graph_inputs(name, torch.float32))
            torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- weight-only int4

def test_int4_quantize_packs_two_weights_a_byte_in_groups():
    """Symmetric round-to-nearest per group of a row, values -7..7 stored + 8; chunk c's byte j holds weight
    c*64 + j in its low nibble and c*64 + 32 + j in its high nibble (docs/CONTRACTS.md)."""
    from internvl_aot.compile.passes.int4_weights import dequantize, quantize
    w = torch.randn(6, 256) * torch.tensor([1e-3, 0.1, 1, 10, 100, 0.0])[:, None]
    w[2, 128:] *= 50                                          # a group of its own scale
    q, s = quantize(w, 128)
    assert q.dtype == torch.uint8 and q.shape == (6, 128) and s.dtype == torch.float32 and s.shape == (6, 2)
    assert float(s[2, 1] / s[2, 0]) > 10
    v = torch.round(w / s.repeat_interleave(128, dim=1)).clamp(-7, 7)
    assert int(v.abs().max()) == 7
    nib = (v + 8).to(torch.uint8).reshape(6, 4, 64)
    assert torch.equal(q.reshape(6, 4, 32) & 0x0F, nib[..., :32]) and torch.equal(q.reshape(6, 4, 32) >> 4, nib[..., 32:])
    err = (dequantize(q, s, 128) - w).abs()
    assert bool((err <= s.repeat_interleave(128, dim=1) / 2 + 1e-12).all())
    assert torch.equal(dequantize(q, s, 128)[5], torch.zeros(256))                    # an all-zero row stays zero
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize(torch.randn(4, 96), 128)


@pytest.mark.parametrize("arch,dtype", [("qwen2", torch.bfloat16), ("llama", torch.float32)],
                         ids=["qwen2-bf16", "llama-fp32"])
def test_int4_weights_match_dequantized_weights(arch, dtype):
    """QUANT=int4 in groups of 64 (the tiny model's K: 64, and 96 for the down projection, which stays in the
    program's dtype): bf16 linears of <= 8 rows call internvl::small_m_linear_int4 (kernel=True), everything else
    GEMMs over dequantised slices; the results are the int4-rounded weights' programs."""
    from internvl_aot.compile import targets
    from internvl_aot.compile.passes import pass_list
    from internvl_aot.runtime.isa import get_target, native_target
    names = pass_list(None, "int4")
    assert names.index("int4_weights") == names.index("small_m_linear") - 1
    # the reference: the same int4-rounded weights in the same dtype through the unquantised graphs
    progs, ref = programs(arch, dtype), _dequantized_programs(arch, group=64, dtype=dtype)
    bf16 = dtype == torch.bfloat16
    tol = dict(atol=0.05, rtol=0.02) if bf16 else dict(atol=1e-4, rtol=1e-4)
    passed = {}
    for name in GRAPHS:
        rows = 16 if name.startswith("prefill") else int(name.split("_")[1][1:])
        for kernel in (True, False):
            new, reports = run_passes(progs[name], names, {"int4_weights": {"kernel": kernel, "group": 64,
                                                                            "native_bf16": True}})
            r = reports["int4_weights"]
            assert r["quantized"] == 3 * LAYERS + 1 and r["kept"] == LAYERS       # qkv, o, gate_up + head; down kept
            assert r["groups"] == {"64": 3 * LAYERS + 1}
            q = {k: t for k, t in new.state_dict.items() if k.endswith(".weight_int4")}
            assert len(q) == 3 * LAYERS + 1 and all(t.dtype == torch.uint8 for t in q.values())
            op = torch.ops.internvl.small_m_linear_int4.default if kernel and bf16 else None
            n_kernel = 0 if op is None else (3 * LAYERS + 1 if rows <= 8 else 1)    # prefill: its one-row head
            assert r["kernel"] == n_kernel == (count_targets(new, op) if op else 0)
            # fp32 graphs: every int4 linear through internvl::linear_fp32_int4 where kernel allows it
            n_gemm = 3 * LAYERS + 1 if kernel and not bf16 else 0
            assert r["gemm_kernel"] == n_gemm == count_targets(new, torch.ops.internvl.linear_fp32_int4.default)
            assert r["gemm_sliced"] == 3 * LAYERS + 1 - n_kernel - n_gemm
            # the slices dequantised by internvl::dequant_int4 where the kernel library may be used, else graph ops
            deq = torch.ops.internvl.dequant_int4.default
            assert r["dequant_op"] == (r["gemm_sliced"] if kernel else 0)
            assert (count_targets(new, deq) > 0) == (kernel and r["gemm_sliced"] > 0)
            expect, _, _ = run(ref[name], graph_inputs(name, dtype))
            got, _, _ = run(new, graph_inputs(name, dtype))
            # the kernel on AVX2 and AVX-512 VNNI builds multiplies x rounded to int8 per group (docs/CONTRACTS.md;
            # per op: test_kernels.check_rounding_bounds): through the tiny model's layers that moved one logit of
            # 256 by 0.068 on a Zen 4 (VNNI), where exact x keeps within 0.05
            t = dict(tol, atol=0.1) if op is not None else tol
            torch.testing.assert_close(got.float(), expect.float(), **t, msg=lambda m: f"{name} kernel={kernel}: {m}")
            passed[name] = new
    # Without native bf16 a bf16 prefill chunk's int4 linears (16 rows) call internvl::linear_fp32_int4.
    if bf16:
        new, reports = run_passes(progs["prefill_t16_c64"], names, {"int4_weights": {"kernel": True, "group": 64,
                                                                                     "native_bf16": False}})
        r = reports["int4_weights"]
        assert r["gemm_kernel"] == count_targets(new, torch.ops.internvl.linear_fp32_int4.default) == 3 * LAYERS
        assert r["gemm_sliced"] == 0 and r["kernel"] == 1
        expect, _, _ = run(ref["prefill_t16_c64"], graph_inputs("prefill_t16_c64", dtype))
        got, _, _ = run(new, graph_inputs("prefill_t16_c64", dtype))
        torch.testing.assert_close(got.float(), expect.float(), **tol)
    # The default group (128) falls back to 64 where 128 does not divide K (here every K).
    assert run_passes(progs["decode_b1_c32"], names)[1]["int4_weights"]["groups"] == {"64": 3 * LAYERS + 1}
    key = next(k for k in passed["decode_b1_c32"].state_dict if k.endswith("qkv_proj.weight_int4"))
    assert passed["decode_b1_c32"].state_dict[key] is passed["prefill_t16_c64"].state_dict[key]   # stored once
    # The target decides by default: the kernel with AVX512-BF16 or AVX2 + FMA, never with AMX or without AVX2.
    if bf16:
        for target, used in ((get_target("x86-64-v3"), True), (get_target("x86-64-v4-bf16"), True),
                             (native_target(["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]), False),
                             (native_target(["sse2", "avx"]), False)):
            with targets.activate(target):
                got = run_passes(progs["decode_b2_c64"], names, {"int4_weights": {"group": 64}})[1]
                assert (got["int4_weights"]["kernel"] > 0) == used, target.name


# ---------------------------------------------------------------- prefill chunks of any length

@pytest.mark.parametrize("quant,target", [("none", "native"), ("none", "x86-64-v3"), ("int8", "x86-64-v3"),
                                          ("int4", "native")])
def test_passes_lower_a_dynamic_chunk_as_its_bucket(quant, target):
    """A prefill graph exported with a dynamic chunk length (compile/export.py dynamic_tokens) is lowered by
    every pass as the static bucket is (a dynamic dimension counts at the bucket's T, program_edit.rows), and
    the passed program, called with the 12 real tokens alone, gives the padded static program's logits and
    cache writes."""
    from internvl_aot.compile import targets
    from internvl_aot.compile.passes import pass_list
    cfg = tiny_config("internlm2")
    model = build_model(cfg, random_weights(cfg, torch.bfloat16, seed=3), max_seq_len=BUCKETS.max_context)
    name = "prefill_t16_c64"
    static = export_graph(model, BUCKETS, name, torch.bfloat16, "cpu")
    dynamic = export_graph(model, BUCKETS, name, torch.bfloat16, "cpu", dynamic_tables=True, dynamic_tokens=True)
    assert {str(n.meta["val"].shape[0]) for n in dynamic.graph.nodes
            if n.op == "placeholder" and n.name == "input_ids"} != {"16"}
    opts = {"small_m_linear": {"kernel": False}, "int8_weights": {"kernel": False},
            "int4_weights": {"kernel": False, "group": 64}, "rope_table": {"max_context": 64}}
    with targets.activate(targets.resolve(target)):
        passes = pass_list(quant=quant)
        s_ep, s_rep = run_passes(static, passes, opts)
        d_ep, d_rep = run_passes(dynamic, passes, opts)
    def decisions(report):   # the op counts differ (a dynamic graph holds its size ops), the decisions must not
        return {p: {k: v for k, v in r.items() if k != "ops"} for p, r in report.items()}
    assert decisions(s_rep) == decisions(d_rep)
    inputs = graph_inputs(name, torch.bfloat16)        # 12 real tokens, 4 padded
    real = int(inputs[6]) + 1
    ref_logits, ref_k, ref_v = run(s_ep, inputs)
    short = [x[:real] for x in inputs[:5]] + inputs[5:]
    logits, k, v = run(d_ep, short)
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=2e-2, rtol=1e-2)
    # The real tokens' K/V are written alike; the padded rows of the static call wrote only the sink block 0.
    torch.testing.assert_close(k[:, 1:].float(), ref_k[:, 1:].float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(v[:, 1:].float(), ref_v[:, 1:].float(), atol=2e-2, rtol=1e-2)
