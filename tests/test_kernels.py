"""kernels/: the small-M bf16 GEMM library (internvl::small_m_linear) against PyTorch's GEMM, and a bf16
artifact whose decode graphs call it against transformers in bf16.

The artifact is compiled with the kernel forced (pass option), so that its path (built for the target,
shipped in the artifact, hashed, loaded before the graphs, called through AOTInductor's proxy executor) is
proven on any CPU: with AVX512-BF16 the vdpbf16ps path runs, elsewhere the library's plain loop.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import checkpoint_dir, compile_tiny
from internvl_aot import kernels
from internvl_aot.compile import targets
from internvl_aot.runtime.engine import Engine
from test_artifact import _requests

SPEC, FMT = "qwen2_vit300m", "hf"     # qwen2: q/k/v biases go through the kernel too
BUCKETS = "vision=1;prefill=128;batch=1,4;context=2048;block_size=16"


def check_every_shape(op):
    """op against F.linear in fp32: 1-8 rows, K and N with and without tails (masked loads, the scalar K
    tail, the last N % R rows), bias or not."""
    g = torch.Generator().manual_seed(0)
    for rows in range(1, 9):
        for k in (31, 64, 1000, 2048):
            for n in (5, 37, 64):
                x = torch.randn(rows, k, generator=g).bfloat16()
                w = torch.randn(n, k, generator=g).bfloat16()
                b = torch.randn(n, generator=g).bfloat16() if n != 64 else None
                want = F.linear(x.float(), w.float(), None if b is None else b.float())
                got = op(x, w, b).float()
                torch.testing.assert_close(got, want, atol=0.05 + 0.01 * want.abs().max().item(), rtol=0.01)


def check_fp32_gemm(op):
    """internvl::linear_fp32 (the prefill and vision GEMM for targets without native bf16) and its int8 / int4
    weight forms against F.linear in float64 over the (dequantised) weights: rows past one 6-row panel and one
    144-row block with a remainder, K past a 256-slice and not a multiple of the 8 x 8 transposes, N past a
    256-column block and not a multiple of the micro-panel (16 columns, 32 in AVX-512 builds); x, b and y bf16 (y rounded once) or fp32.
    `op` is torch.ops.internvl.linear_fp32 of the library under test (its _int8 / _int4 siblings beside it)."""
    from internvl_aot.compile.passes import int4_weights, int8_weights
    ops = torch.ops.internvl
    g = torch.Generator().manual_seed(3)
    for rows, k, n in ((1, 5, 3), (7, 33, 17), (13, 300, 40), (150, 257, 530), (6, 16, 16), (301, 1000, 33),
                       (9, 384, 20)):
        w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
        forms = [(op, (w.bfloat16(),), w.bfloat16().double())]
        q8, s8 = int8_weights.quantize(w)
        forms.append((ops.linear_fp32_int8, (q8, s8), q8.double() * s8.double()[:, None]))
        if k % 64 == 0:
            group = 128 if k % 128 == 0 else 64
            q4, s4 = int4_weights.quantize(w, group)
            forms.append((ops.linear_fp32_int4, (q4, s4, group), int4_weights.dequantize(q4, s4, group).double()))
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            x = torch.randn(rows, k, generator=g).to(dtype)
            for f, weight_args, dense in forms:
                for b in (torch.randn(n, generator=g).to(dtype), None):
                    want = F.linear(x.double(), dense, None if b is None else b.double())
                    got = f(x, *weight_args, b)
                    assert got.dtype == dtype and got.shape == (rows, n)
                    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    with pytest.raises(RuntimeError, match="int8 q"):
        ops.linear_fp32_int8(torch.randn(9, 64), torch.ones(8, 64, dtype=torch.int8), torch.ones(8).bfloat16())
    with pytest.raises(RuntimeError, match="group a multiple of 64"):
        ops.linear_fp32_int4(torch.randn(9, 64), torch.ones(8, 32, dtype=torch.uint8), torch.ones(8, 2), 32)
    assert op(torch.randn(2, 3, 64).bfloat16(), torch.randn(8, 64).bfloat16()).shape == (2, 3, 8)
    assert torch.equal(op(torch.randn(4, 0), torch.randn(3, 0).bfloat16(), torch.arange(3.)),
                       torch.arange(3.).expand(4, 3))       # K = 0: the bias alone
    with pytest.raises(RuntimeError, match="bf16 weights"):
        op(torch.randn(9, 64), torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="bias must be"):
        op(torch.randn(9, 64), torch.randn(8, 64).bfloat16(), torch.randn(8).bfloat16())
    # Its shapes are symbolic under export: a prefill graph's dynamic chunk length stays dynamic.
    w = torch.nn.Parameter(torch.randn(32, 16).bfloat16())
    lin = type("Lin", (torch.nn.Module,), {"forward": lambda self, x: op(x, w, None) * 2})()
    ep = torch.export.export(lin, (torch.randn(1, 20, 16).bfloat16(),),
                             dynamic_shapes={"x": {1: torch.export.Dim("t", min=2, max=64)}})
    assert ep.module()(torch.randn(1, 7, 16).bfloat16()).shape == (1, 7, 32)


def check_int8_every_shape(op):
    """The int8 op against F.linear over the dequantised weights: 1-8 rows (padded to 2/4/8 inside), K with
    and without a tail of the 64- (VBMI) / 32- / 8-element steps, the last N % R rows, bias or not; the
    weights as int8_weights quantises them (symmetric, [-127, 127], an fp32 scale per row)."""
    from internvl_aot.compile.passes.int8_weights import quantize
    g = torch.Generator().manual_seed(1)
    for rows in range(1, 9):
        for k in (31, 64, 100, 2048):
            for n in (5, 37, 64):
                x = torch.randn(rows, k, generator=g).bfloat16()
                q, s = quantize(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g))
                b = torch.randn(n, generator=g).bfloat16() if n != 64 else None
                want = F.linear(x.float(), q.float() * s[:, None], None if b is None else b.float())
                got = op(x, q, s, b).float()
                torch.testing.assert_close(got, want, atol=0.02 + 0.01 * want.abs().max().item(), rtol=0.01)


def check_int4_every_shape(op):
    """The int4 op against F.linear over the dequantised weights (int4_weights.quantize / dequantize: the layout
    of docs/CONTRACTS.md): 1-8 rows, groups of 64, 128 and 256, K of 1-32 chunks, the last N % R rows, bias or not;
    internvl::dequant_int4 against dequantize; shapes they cannot take are refused with a message."""
    from internvl_aot.compile.passes.int4_weights import dequantize, quantize
    g = torch.Generator().manual_seed(2)
    for rows in range(1, 9):
        for k, group in ((64, 64), (192, 64), (512, 256), (2048, 128)):
            for n in (5, 37, 64):
                x = torch.randn(rows, k, generator=g).bfloat16()
                q, s = quantize(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g), group)
                b = torch.randn(n, generator=g).bfloat16() if n != 64 else None
                want = F.linear(x.float(), dequantize(q, s, group), None if b is None else b.float())
                got = op(x, q, s, group, b).float()
                torch.testing.assert_close(got, want, atol=0.02 + 0.01 * want.abs().max().item(), rtol=0.01)
            # internvl::dequant_int4 (prefill's slices): the same weights, fp32 exactly, bf16 rounded to nearest
            w = dequantize(q, s, group)
            assert torch.equal(torch.ops.internvl.dequant_int4(q, s, group, True), w)
            assert torch.equal(torch.ops.internvl.dequant_int4(q, s, group), w.bfloat16())
    q, s = quantize(torch.randn(8, 256))
    assert op(torch.randn(3, 1, 256).bfloat16(), q, s, 128).shape == (3, 1, 8)
    with pytest.raises(RuntimeError, match="dequant_int4"):
        torch.ops.internvl.dequant_int4(q, s[:, :1], 128)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        op(torch.randn(1, 256).bfloat16(), q, s, 32)
    with pytest.raises(RuntimeError, match=r"s \[N, K / group\]"):
        op(torch.randn(1, 256).bfloat16(), q, s[:, :1], 128)
    with pytest.raises(RuntimeError, match="uint8 q"):
        op(torch.randn(1, 256).bfloat16(), q.to(torch.int8), s, 128)


def check_rounding_bounds(int8_op, int4_op):
    """What the quantised ops may do to x (docs/CONTRACTS.md): the AVX2 builds multiply integers, x rounded per row
    to int16 in blocks of 2048 (int8 op) or to int8 per weight group (int4 op), to nearest, step = max |x| / 32767 or
    / 127 over the block; the AVX-512 builds with VNNI round x for both ops alike; the other AVX512-BF16 paths
    multiply x as it is. Each result equals one of the two products
    (x exact, or x rounded so) to within the bf16 output's rounding and fp32 summation, and is within the rounding's
    bound sum_k |W[n, k]| * step(k) / 2 of the exact one. x with an outlier channel, as LLM activations have (a
    step per row instead of per block misses the rounded product by far)."""
    from internvl_aot.compile.passes.int4_weights import dequantize, quantize
    g = torch.Generator().manual_seed(5)

    def check(got, x, w, block, top):
        xf = x.float()
        k = xf.shape[1]
        xr, bound = xf.clone(), torch.zeros(xf.shape[0], w.shape[0])
        for a in range(0, k - k % 16, block):
            b = min(a + block, k - k % 16)
            step = xf[:, a:b].abs().amax(-1, keepdim=True) / top
            xr[:, a:b] = torch.where(step > 0, torch.round(xf[:, a:b] * (1 / step)) * step, 0.)
            bound += 0.5 * step * w[:, a:b].abs().sum(-1)[None, :]
        exact, rounded = xf @ w.T, xr @ w.T
        noise = 1e-5 * (xf.abs() @ w.abs().T) + got.abs() * 2 ** -8 + 1e-6
        assert ((got - exact).abs() <= bound + noise).all()
        near = [((got - want).abs() <= noise).all().item() for want in (exact, rounded)]
        assert any(near), (x.shape, block, (got - exact).abs().max().item(), (got - rounded).abs().max().item())

    # K = 4400: three int16 blocks, the last 304 long (its last 16 elements a half vector of the AVX-512 loop);
    # K = 1088 in groups of 64: 17 groups, one more than the VNNI int4 loop takes the factors of in one vector
    for rows, k, n, group in ((1, 2048, 64, 128), (8, 512, 37, 64), (3, 1024, 5, 256), (5, 200, 9, None),
                              (4, 4400, 6, None), (6, 1088, 11, 64)):
        x = torch.randn(rows, k, generator=g)
        x[:, 7] *= 40.
        x = x.bfloat16()
        q8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s8 = torch.rand(n, generator=g) / 100
        check(int8_op(x, q8, s8).float(), x, q8.float() * s8[:, None], 2048, 32767.)
        if group:
            q4, s4 = quantize(torch.randn(n, k, generator=g), group)
            check(int4_op(x, q4, s4, group).float(), x, dequantize(q4, s4, group), group, 127.)
    # a NaN or an infinity in a row of x makes that row's outputs NaN (or infinite), as in an fp32 product; the
    # rounding must not turn it into a finite number
    q4, s4 = quantize(torch.randn(9, 256, generator=g), 128)
    q8 = torch.randint(-127, 128, (9, 256), generator=g, dtype=torch.int8)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(3, 256, generator=g).bfloat16()
        x[1, 70] = bad
        for got in (int8_op(x, q8, torch.rand(9, generator=g)), int4_op(x, q4, s4, 128)):
            assert not got[1].float().isfinite().any() and got[[0, 2]].float().isfinite().all()


def check_attention(op):
    """internvl::paged_decode_attention against dense attention written from the definition (test_attention.py)
    over keys 0..position scattered in the pool: GQA groups of 1, 2, 7 and 20 (more than the 8 of one pass),
    head_dim 16 to 128, blocks of 4 to 32 keys, tables wider than the keys in use, fp32 and bf16."""
    from test_attention import dense_reference, make_case
    cases = [(3, 8, 2, 16, 4, 6), (1, 16, 8, 128, 32, 5), (8, 14, 2, 64, 16, 4), (2, 40, 2, 32, 8, 3),
             (4, 4, 4, 96, 32, 2)]
    for seed, (b, heads, kv_heads, d, block_size, max_blocks) in enumerate(cases):
        for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
            q, kc, vc, tables, positions, seqs = make_case(b, 1, heads, kv_heads, d, block_size, max_blocks, dtype,
                                                           seed=seed)
            out = op(q, kc, vc, 1, tables, positions, d ** -0.5)
            assert out.shape == q.shape and out.dtype == dtype
            for i, (keys, values) in enumerate(seqs):
                want = dense_reference(q[i], keys, values, positions[i], d ** -0.5)
                torch.testing.assert_close(out[i].float(), want, atol=tol, rtol=tol)


def test_kernel_matches_the_gemm_at_every_shape():
    """The library built for this box (its vdpbf16ps path where the box has AVX512-BF16); leading dims
    are kept; bad inputs are refused with a message."""
    kernels.ensure_built(targets.current())
    op = torch.ops.internvl.small_m_linear
    check_every_shape(op)
    check_int8_every_shape(torch.ops.internvl.small_m_linear_int8)
    check_int4_every_shape(torch.ops.internvl.small_m_linear_int4)
    check_rounding_bounds(torch.ops.internvl.small_m_linear_int8, torch.ops.internvl.small_m_linear_int4)
    check_fp32_gemm(torch.ops.internvl.linear_fp32)
    assert op(torch.randn(2, 1, 64).bfloat16(), torch.randn(8, 64).bfloat16()).shape == (2, 1, 8)
    q8 = torch.ops.internvl.small_m_linear_int8
    assert q8(torch.randn(3, 1, 64).bfloat16(), torch.ones(8, 64, dtype=torch.int8), torch.ones(8)).shape == (3, 1, 8)
    with pytest.raises(RuntimeError, match="int8 q and fp32 scales"):
        q8(torch.randn(1, 64).bfloat16(), torch.ones(8, 64, dtype=torch.int8), torch.ones(8).bfloat16())
    with pytest.raises(RuntimeError, match=r"s \[N\]"):
        q8(torch.randn(1, 64).bfloat16(), torch.ones(8, 64, dtype=torch.int8), torch.ones(7))
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        op(torch.randn(9, 64).bfloat16(), torch.randn(8, 64).bfloat16())
    with pytest.raises(RuntimeError, match="bf16"):
        op(torch.randn(1, 64), torch.randn(8, 64))
    with pytest.raises(kernels.KernelError, match="version"):      # one version of the ops per process
        kernels.load(kernels.library_for(targets.current()), version=kernels.KERNELS_VERSION + 1)


def test_decode_attention_kernel_matches_dense_attention():
    """The library built for this box; a block table naming no block of the pool, a head_dim the vector loops
    cannot take and a dtype mismatch are refused with a message, never read."""
    kernels.ensure_built(targets.current())
    op = torch.ops.internvl.paged_decode_attention
    check_attention(op)
    q, kc, vc = torch.randn(2, 1, 4, 16), torch.randn(2, 5, 4, 2, 16), torch.randn(2, 5, 4, 2, 16)
    positions = torch.tensor([[6], [2]])
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 1\] = 9 is not a block of the pool"):
        op(q, kc, vc, 0, torch.tensor([[1, 9], [2, 3]]), positions, 0.25)
    assert op(q, kc, vc, 0, torch.tensor([[1, 2], [3, 9]]), positions, 0.25).shape == q.shape   # block 9 unread
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(torch.randn(2, 1, 4, 8), torch.randn(2, 5, 4, 2, 8), torch.randn(2, 5, 4, 2, 8), 0,
           torch.tensor([[1], [2]]), positions, 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(q.bfloat16(), kc, vc, 0, torch.tensor([[1, 2], [3, 4]]), positions, 0.25)


def test_the_other_targets_builds_match_the_gemm():
    """The library built for x86-64-v3 (its AVX2 + FMA loops, what an AVX2 box's artifact ships), for x86-64-v4
    (AVX-512 without native bf16: the fp32 GEMM's zmm micro-kernel, which its graphs call), for x86-64-v4-bf16
    (AVX512-BF16 without VBMI: the int8 op's sign-extend + convert path) and for plain x86-64 (the scalar loops),
    each in a process of its own (one library per process)."""
    import subprocess
    import sys
    from internvl_aot.runtime.isa import cpu_flags, get_target
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU cannot run x86-64-v3 code")
    v4 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= cpu_flags()
    names = ["x86-64", "x86-64-v3"] + (["x86-64-v4"] if v4 else []) + \
        (["x86-64-v4-bf16"] if v4 and "avx512_bf16" in cpu_flags() else [])
    for name in names:
        lib = kernels.cached_build(["-march=x86-64", "-mtune=generic"]) if name == "x86-64" else \
            kernels.library_for(get_target(name))
        code = (f"import torch, test_kernels as t; torch.ops.load_library({str(lib)!r}); "
                "t.check_every_shape(torch.ops.internvl.small_m_linear); "
                "t.check_int8_every_shape(torch.ops.internvl.small_m_linear_int8); "
                "t.check_int4_every_shape(torch.ops.internvl.small_m_linear_int4); "
                "t.check_rounding_bounds(torch.ops.internvl.small_m_linear_int8, "
                "torch.ops.internvl.small_m_linear_int4); "
                "t.check_attention(torch.ops.internvl.paged_decode_attention); "
                "t.check_fp32_gemm(torch.ops.internvl.linear_fp32); print('ok')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=str(Path(__file__).parent))
        assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (name, done.stderr[-2000:])


@pytest.fixture(scope="module")
def kernel_artifact(tiny_checkpoints, tmp_path_factory):
    return compile_tiny(tiny_checkpoints[SPEC], FMT, tmp_path_factory.mktemp("kernels") / "bf16", BUCKETS,
                        dtype="bf16", pass_options={"small_m_linear": {"kernel": True}}, attention_kernel=True)


@pytest.fixture(scope="module")
def int8_kernel_artifact(tiny_checkpoints, tmp_path_factory):
    # the decode attention of graphs/attention.py (multiply + sum) here, the kernel in kernel_artifact
    return compile_tiny(tiny_checkpoints[SPEC], FMT, tmp_path_factory.mktemp("kernels") / "bf16-int8", BUCKETS,
                        dtype="bf16", quant="int8", pass_options={"int8_weights": {"kernel": True}},
                        attention_kernel=False)


@pytest.fixture(scope="module")
def int4_kernel_artifact(tiny_checkpoints, tmp_path_factory):
    # groups of 64: the tiny LLM's K is 64 (96 for the down projection, which stays bf16)
    return compile_tiny(tiny_checkpoints[SPEC], FMT, tmp_path_factory.mktemp("kernels") / "bf16-int4", BUCKETS,
                        dtype="bf16", quant="int4", pass_options={"int4_weights": {"kernel": True, "group": 64}})


@pytest.fixture(scope="module")
def avx2_artifact(tiny_checkpoints, tmp_path_factory):
    """A bf16 artifact for x86-64-v3 (AVX2 + FMA, no native bf16), the target's defaults: its vision and prefill
    linears call internvl::linear_fp32 (compile/passes/fp32_gemm.py), its decode linears small_m_linear."""
    from internvl_aot.runtime.isa import cpu_flags
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("this CPU cannot run x86-64-v3 code")
    return compile_tiny(tiny_checkpoints[SPEC], FMT, tmp_path_factory.mktemp("kernels") / "bf16-v3", BUCKETS,
                        dtype="bf16", target="x86-64-v3")


def _hf_bf16_logits(hf, prompt_ids, out_ids, tiles):
    """transformers in bf16, teacher-forced on prompt + our tokens: the logits at each generated position."""
    ids = torch.tensor([prompt_ids + out_ids])
    kw = {"pixel_values": tiles.to(torch.bfloat16)} if tiles is not None else {}
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0].float()
    return logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(out_ids)]


def _follows_transformers(artifact, hf):
    """Every greedy token of the batch-4 graph (3 sequences) and of the batch-1 graph is transformers' argmax,
    or within bf16 noise of it (3% of the logits' spread), and >= 75% are its argmax exactly."""
    engine = Engine.from_artifact(artifact)
    reqs = _requests(12)
    together = engine.generate(reqs)
    for req, res in zip(reqs, together):
        alone = engine.generate([req])[0]
        tiles = engine.make_sequence(req).pixel_values
        for out in (res.output_token_ids, alone.output_token_ids):
            logits = _hf_bf16_logits(hf, res.prompt_token_ids, out, tiles)
            chosen = logits.gather(1, torch.tensor(out)[:, None])[:, 0]
            spread = logits.max(1).values - logits.min(1).values
            assert bool((chosen >= logits.max(1).values - 0.03 * spread).all()), req.prompt
            assert (logits.argmax(1) == torch.tensor(out)).float().mean() >= 0.75, req.prompt
    assert max(len(set(r.output_token_ids)) for r in together) > 3


def _calls(artifact, graph, op):
    """How many times the compiled package of `graph` calls internvl::`op` (its proxy executor's op list)."""
    import zipfile
    manifest = json.loads((artifact / "manifest.json").read_text())
    package = artifact / manifest["ranks"][0]["graphs"][graph]["package"]
    with zipfile.ZipFile(package) as z:
        texts = [z.read(n).decode() for n in z.namelist() if n.endswith(".json") and "wrapper" in n]
    return sum(t.count(f"internvl::{op}") for t in texts)


def _n_layers(tiny_checkpoints):
    return json.loads((checkpoint_dir(tiny_checkpoints[SPEC], FMT) / "config.json").read_text()
                      )["text_config"]["num_hidden_layers"]


def test_bf16_artifact_with_the_kernel_follows_transformers(kernel_artifact, tiny_checkpoints):
    manifest = json.loads((kernel_artifact / "manifest.json").read_text())
    entry = manifest["compile"]["lowering"]["kernels"]
    assert entry["library"] == kernels.KERNELS_LIBRARY and entry["version"] == kernels.KERNELS_VERSION
    assert kernels.KERNELS_LIBRARY in manifest["files"]            # hashed and signed like the graphs
    reports = manifest["compile"]["passes"]
    n_layers = _n_layers(tiny_checkpoints)
    for name in ("decode_b1_c2048", "decode_b4_c2048"):          # every linear of a decode step: 4 per layer + head
        assert reports[name]["passes"]["small_m_linear"]["kernel"] == 4 * n_layers + 1
    assert reports["prefill_t128_c2048"]["passes"]["small_m_linear"]["kernel"] == 1      # its one-row head
    assert manifest["compile"]["lowering"]["decode_attention"] == "kernel"
    for name in ("decode_b1_c2048", "decode_b4_c2048"):          # one call per layer, through AOTInductor's proxy
        assert _calls(kernel_artifact, name, "paged_decode_attention") == n_layers
    _follows_transformers(kernel_artifact, tiny_checkpoints[SPEC].load_hf_model().to(torch.bfloat16).eval())


def test_avx2_bf16_artifact_with_the_fp32_gemm_follows_transformers(avx2_artifact, tiny_checkpoints):
    """The x86-64-v3 artifact's vision and prefill linears go through internvl::linear_fp32 (every one: none is
    left to PyTorch's bf16 GEMM, which has no fast path there), the prefill graph keeps its dynamic chunk length
    (the op's shapes are symbolic), and its tokens follow transformers in bf16 over prompts of several lengths."""
    manifest = json.loads((avx2_artifact / "manifest.json").read_text())
    reports = manifest["compile"]["passes"]
    n_layers = _n_layers(tiny_checkpoints)
    prefill = reports["prefill_t128_c2048"]["passes"]["fp32_gemm"]
    assert prefill["native_bf16"] is False and prefill["kernel"] == 4 * n_layers      # the one-row head: small_m
    assert _calls(avx2_artifact, "prefill_t128_c2048", "linear_fp32") >= 4 * n_layers
    assert reports["vision_n1"]["passes"]["fp32_gemm"]["kernel"] > 0
    assert all(r["passes"]["fp32_gemm"]["kernel"] == 0 for n, r in reports.items() if n.startswith("decode"))
    # the bench times this op beside torch's GEMMs for the first token's compute fraction; not for other artifacts
    from internvl_aot.bench.cli import artifact_gemm_ops
    ops = artifact_gemm_ops(avx2_artifact, manifest)
    assert list(ops) == ["linear_fp32"] and ops["linear_fp32"](torch.ones(9, 16).bfloat16(),
                                                               torch.ones(4, 16).bfloat16()).tolist() == [[16.0] * 4] * 9
    assert artifact_gemm_ops(Path("unused"), {"compile": {"passes": {"prefill": {"passes": {"fp32_gemm": {
        "kernel": 0}}}}}}) == {}
    _follows_transformers(avx2_artifact, tiny_checkpoints[SPEC].load_hf_model().to(torch.bfloat16).eval())


def test_int8_bf16_artifact_with_the_int8_kernel_follows_transformers(int8_kernel_artifact, tiny_checkpoints):
    """QUANT=int8 in bf16: the decode steps' linears read the int8 matrices through internvl::small_m_linear_int8;
    against transformers in bf16 holding the same int8-rounded weights (test_quant.py)."""
    from test_quant import _int8_rounded_hf
    manifest = json.loads((int8_kernel_artifact / "manifest.json").read_text())
    assert manifest["compile"]["lowering"]["quant"] == "int8"
    assert manifest["compile"]["lowering"]["kernels"]["ops"] == kernels.OPS
    assert manifest["compile"]["lowering"]["decode_attention"] == "graph"
    assert _calls(int8_kernel_artifact, "decode_b4_c2048", "paged_decode_attention") == 0
    reports = manifest["compile"]["passes"]
    n_layers = _n_layers(tiny_checkpoints)
    for name in ("decode_b1_c2048", "decode_b4_c2048"):
        assert reports[name]["passes"]["int8_weights"]["kernel"] == 4 * n_layers + 1
        assert reports[name]["passes"]["small_m_linear"]["kernel"] == 0     # no bf16 LLM weight is left
    assert reports["prefill_t128_c2048"]["passes"]["int8_weights"]["kernel"] == 1
    hf, _ = _int8_rounded_hf(tiny_checkpoints)
    _follows_transformers(int8_kernel_artifact, hf.to(torch.bfloat16).eval())


def test_int4_bf16_artifact_with_the_int4_kernel_follows_transformers(int4_kernel_artifact, tiny_checkpoints):
    """QUANT=int4 in bf16: the decode steps' linears read the packed int4 matrices through
    internvl::small_m_linear_int4, the prefill chunks dequantise slices (or, without native bf16, go through
    internvl::linear_fp32_int4); against transformers in bf16 whose LLM
    linear weights are the same int4 rounding (int4_weights.quantize of the bf16 weights, groups of 64)."""
    from internvl_aot.compile.passes.int4_weights import dequantize, quantize
    manifest = json.loads((int4_kernel_artifact / "manifest.json").read_text())
    assert manifest["compile"]["lowering"]["quant"] == "int4"
    reports = manifest["compile"]["passes"]
    n_layers = _n_layers(tiny_checkpoints)
    for name in ("decode_b1_c2048", "decode_b4_c2048"):
        r = reports[name]["passes"]["int4_weights"]
        assert r["kernel"] == 3 * n_layers + 1 and r["kept"] == n_layers and r["groups"] == {"64": 3 * n_layers + 1}
    prefill = reports["prefill_t128_c2048"]["passes"]["int4_weights"]
    # the prefill chunk: dequantised slices where this box has native bf16, else internvl::linear_fp32_int4
    wide = 0 if targets.current().native_bf16 else 3 * n_layers
    assert (prefill["gemm_sliced"], prefill["gemm_kernel"]) == (3 * n_layers - wide, wide)
    hf = tiny_checkpoints[SPEC].load_hf_model().to(torch.bfloat16).eval()
    linears = [m for m in hf.model.language_model.modules() if isinstance(m, torch.nn.Linear)] + [hf.lm_head]
    rounded = 0
    with torch.no_grad():
        for m in linears:
            if m.weight.shape[1] % 64 == 0:
                m.weight.copy_(dequantize(*quantize(m.weight, 64), 64))
                rounded += 1
    assert rounded == 6 * n_layers + 1              # q, k, v, o, gate, up per layer + the head; down stays
    _follows_transformers(int4_kernel_artifact, hf)


def test_a_bundle_runs_the_kernel_in_a_fresh_process(kernel_artifact, tmp_path):
    """Packed into one file and run by internvl-run in a new process (which never compiled, so the ops come
    from the artifact's own library): the same tokens as in this process."""
    import subprocess
    import sys
    from internvl_aot.runtime import bundle
    from internvl_aot.runtime.sampler import SamplingParams
    from internvl_aot.runtime.engine import Request
    packed = tmp_path / "model.ivl"
    bundle.pack(kernel_artifact, packed)
    prompt = "Hello, world! Please answer the question briefly."
    want = Engine.from_artifact(kernel_artifact).generate(
        [Request(prompt=prompt, params=SamplingParams(max_new_tokens=10))])[0].output_token_ids
    env = {**os.environ, "INTERNVL_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "internvl_aot.runtime.cli", "--artifact", str(packed), "--prompt",
                           prompt, "--max-new-tokens", "10", "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["output_token_ids"] == want


def test_a_missing_kernel_library_is_refused(kernel_artifact, tmp_path):
    import shutil
    from internvl_aot.runtime.errors import ArtifactError
    art = tmp_path / "art"
    shutil.copytree(kernel_artifact, art)
    (art / kernels.KERNELS_LIBRARY).unlink()
    with pytest.raises(ArtifactError, match="internvl_kernels.so"):
        Engine.from_artifact(art)


def test_the_kernels_flag_reaches_every_pass_with_a_kernel():
    """internvl-compile --kernels off|on (make KERNELS=...): the `kernel` option of every pass that has one
    (small_m_linear, int8_weights, int4_weights, fp32_gemm), and the decode attention kernel; auto leaves the target to decide."""
    import importlib
    import inspect
    from internvl_aot.compile.passes import PASS_ORDER, QUANT_PASSES
    from internvl_aot.compile.cli import ATTENTION_KERNEL, kernel_options
    from internvl_aot.runtime.isa import get_target
    assert ATTENTION_KERNEL == {"auto": None, "on": True, "off": False}
    assert kernels.attention_kernel(get_target("x86-64-v3")) and kernels.attention_kernel(get_target("x86-64-v4"))
    assert kernel_options("auto") is None
    with_kernel = [n for n in PASS_ORDER + list(QUANT_PASSES.values()) if "kernel" in inspect.signature(
        importlib.import_module(f"internvl_aot.compile.passes.{n}").apply).parameters]
    assert sorted(with_kernel) == ["fp32_gemm", "int4_weights", "int8_weights", "small_m_linear"]
    for choice, on in (("off", False), ("on", True)):
        assert kernel_options(choice) == {n: {"kernel": on} for n in with_kernel}
