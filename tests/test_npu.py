"""The Ascend NPU graph variant on CPU (issue 21), through the CPU stand-ins of the NPU operators
(graphs/npu_ops.py, graphs/npu_variant.py): the stage graphs equal ours (logits and KV writes within
1e-4, fp32), the Engine gives identical greedy tokens for single-image, multi-image and text prompts,
and the variant passes torch.compile(backend="aot_eager", fullgraph=True, dynamic=False) and
torch.export with the NPU operators kept as single nodes. Nothing here needs an NPU, CANN,
torch_npu or torchair; the tests that would are marked `npu` and skipped with the reason.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import checkpoint_dir  # noqa: E402
from internvl_aot.compile.buckets import Buckets  # noqa: E402
from internvl_aot.compile.checkpoint import load_checkpoint  # noqa: E402
from internvl_aot.compile.export import stage_module  # noqa: E402
from internvl_aot.graphs import npu_ops  # noqa: E402
from internvl_aot.graphs.model import build_model  # noqa: E402
from internvl_aot.graphs.npu_variant import to_npu_variant, uses_npu_ops  # noqa: E402
from internvl_aot.runtime.buckets import GraphKey, graph_inputs  # noqa: E402
from internvl_aot.runtime.engine import Request  # noqa: E402
from internvl_aot.runtime.sampler import SamplingParams  # noqa: E402

BUCKETS = Buckets(vision=(1,), prefill=(32,), batch=(1, 4), context=(256,), block_size=16)
ENGINE_BUCKETS = Buckets(vision=(1,), prefill=(128,), batch=(1, 4), context=(1024,), block_size=16)
CASES = [("llama_vit300m", "internlm2"),   # InternLM2 backbone, GQA 4/2, InternViT-300M (LayerNorm)
         ("qwen2_vit6b", "hf")]            # Qwen2 (q/k/v bias), InternViT-6B style (RMSNorm in the ViT)


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def ckpt(request, tiny_checkpoints):
    spec, fmt = request.param
    path = checkpoint_dir(tiny_checkpoints[spec], fmt)
    cfg, weights = load_checkpoint(path)
    return cfg, weights, path


@pytest.fixture(scope="module")
def internlm2(tiny_checkpoints):
    cfg, weights = load_checkpoint(checkpoint_dir(tiny_checkpoints["llama_vit300m"], "internlm2"))
    return cfg, weights


def _models(cfg, weights):
    ref = build_model(cfg, weights, max_seq_len=BUCKETS.max_context)
    npu = to_npu_variant(build_model(cfg, weights, max_seq_len=BUCKETS.max_context))
    return ref, npu


def _inputs(cfg, name, seed=0):
    """Realistic inputs of graph `name`: a second prefill chunk / decode rows at different
    positions over distinct blocks of a pool whose other slots hold random K/V."""
    g = torch.Generator().manual_seed(seed)
    key = GraphKey.parse(name)
    if key.stage == "vision":
        return (torch.randn(key.size, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g),)
    bs, mb = BUCKETS.block_size, key.context // BUCKETS.block_size
    llm = cfg.llm
    rows = 1 if key.stage == "prefill" else key.size
    nblocks = rows * mb + 1
    kv = [torch.randn(llm.num_layers, nblocks, bs, llm.num_kv_heads, llm.head_dim, generator=g) for _ in range(2)]
    tables = (1 + torch.randperm(rows * mb, generator=g)).view(rows, mb)
    if key.stage == "prefill":
        t = key.size
        pos = torch.arange(t) + 40                     # the second chunk: keys 0..39 already in the pool
        slots = tables[0][pos // bs] * bs + pos % bs
        ids = torch.randint(0, llm.vocab_size, (t,), generator=g)
        emb = torch.randn(t, llm.hidden_size, generator=g)
        mask = torch.zeros(t, dtype=torch.bool)
        mask[5:20] = True
        return (ids, pos, emb, mask, slots, tables, torch.tensor([t - 3]), *kv)
    pos = torch.tensor([3, 17, 100, 250][:rows])
    slots = tables[torch.arange(rows), pos // bs] * bs + pos % bs
    ids = torch.randint(0, llm.vocab_size, (rows,), generator=g)
    return (ids, pos, slots, tables, *kv)


def _clone(args):
    return tuple(a.clone() for a in args)


@pytest.mark.parametrize("name", ["vision_n1", "prefill_t32_c256", "decode_b4_c256"])
def test_stage_graphs_equal_ours(ckpt, name):
    cfg, weights, _ = ckpt
    ref, npu = _models(cfg, weights)
    args = _inputs(cfg, name)
    a, b = _clone(args), _clone(args)
    with torch.no_grad():
        want = stage_module(ref, name)(*a)
        got = stage_module(npu, name)(*b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if GraphKey.parse(name).stage != "vision":
        for x, y, orig in zip(b[-2:], a[-2:], args[-2:]):          # the K/V writes: same slots, same values
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
            assert not torch.equal(x, orig)


def _requests():
    import numpy as np
    from PIL import Image

    def img(seed, w, h):
        return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))

    def p(n):
        return SamplingParams(max_new_tokens=n, ignore_eos=True)
    return [Request(prompt="What is shown in this picture?", images=[img(1, 700, 400)], max_tiles=1, params=p(8)),
            Request(prompt="Image-1: <image>\nImage-2: <image>\nCompare them.",
                    images=[img(2, 300, 300), img(3, 200, 900)], max_tiles=1, params=p(5)),
            Request(prompt="Hello, world! Please answer the question briefly.", params=p(10))]


def test_engine_greedy_tokens_equal_ours(ckpt):
    """Single-image, multi-image and text prompts batched together through Engine: identical tokens."""
    from internvl_aot.compile.backends.npu import eager_npu_engine
    from internvl_aot.compile.eager import eager_engine
    cfg, weights, path = ckpt
    reqs = _requests()
    want = eager_engine(cfg, weights, path, ENGINE_BUCKETS).generate(reqs)
    got = eager_npu_engine(cfg, weights, path, ENGINE_BUCKETS).generate(reqs)
    assert [r.num_tiles for r in got] == [[1], [1, 1], []]
    for r, w, g in zip(reqs, want, got):
        assert g.prompt_token_ids == w.prompt_token_ids
        assert g.output_token_ids == w.output_token_ids, r.prompt
        assert len(g.output_token_ids) == r.params.max_new_tokens


def _op_names(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("name", ["prefill_t32_c256", "decode_b4_c256"])
def test_npu_variant_under_aot_eager_fullgraph_static(internlm2, name):
    """torchair's documented precondition: one graph, no breaks, static shapes; the KV writes survive
    functionalization (the pool written in place, as eager)."""
    cfg, weights = internlm2
    _, npu = _models(cfg, weights)
    mod = stage_module(npu, name)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    args = _inputs(cfg, name, seed=1)
    eager_args, comp_args = _clone(args), _clone(args)
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        want = mod(*eager_args)
        got = compiled(*comp_args)
    assert len(graphs) == 1
    ops = uses_npu_ops(graphs[0])
    layers = cfg.llm.num_layers
    assert ops["npu_fused_infer_attention_score"] == layers
    assert ops["npu_scatter_nd_update_"] == 2 * layers
    assert ops["npu_apply_rotary_pos_emb"] == layers and ops["npu_swiglu"] == layers
    assert ops["npu_add_rms_norm"] == 2 * layers - 1 and ops["npu_rms_norm"] == 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for x, y in zip(comp_args[-2:], eager_args[-2:]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_npu_variant_exports(internlm2):
    """torch.export of a prefill and a decode graph: the NPU ops are single nodes, the KV pool is
    a mutated input after decompositions (functionalized to npu_scatter_nd_update), and the
    exported program computes what eager does."""
    cfg, weights = internlm2
    _, npu = _models(cfg, weights)
    for name in ("prefill_t32_c256", "decode_b4_c256"):
        mod = stage_module(npu, name)
        args = _inputs(cfg, name, seed=2)
        with torch.no_grad():
            ep = torch.export.export(mod, _clone(args), strict=False)
            ops = uses_npu_ops(ep)
            assert ops["npu_fused_infer_attention_score"] == cfg.llm.num_layers
            assert ops["npu_scatter_nd_update_"] == 2 * cfg.llm.num_layers
            dec = ep.run_decompositions()
            mutated = set(dec.graph_signature.user_inputs_to_mutate.values())
            assert mutated == {"k_cache", "v_cache"}
            assert uses_npu_ops(dec)["npu_scatter_nd_update"] == 2 * cfg.llm.num_layers
            a, b = _clone(args), _clone(args)
            torch.testing.assert_close(dec.module()(*a), mod(*b), atol=1e-5, rtol=1e-5)
            for x, y in zip(a[-2:], b[-2:]):
                torch.testing.assert_close(x, y)


def test_stand_in_semantics_by_hand():
    """Each stand-in against a formula written here, so the equality tests above do not rest on two
    copies of one mistake: FIA with a paged BSH cache, a mask, GQA and actual_seq_lengths_kv."""
    ops = getattr(torch.ops, npu_ops.NAMESPACE)
    g = torch.Generator().manual_seed(0)
    b, sq, h, kvh, d, bs, nb = 2, 3, 4, 2, 8, 4, 6
    q = torch.randn(b, sq, h * d, generator=g)
    kc, vc = torch.randn(nb, bs, kvh * d, generator=g), torch.randn(nb, bs, kvh * d, generator=g)
    table = torch.tensor([[2, 5], [4, 1]], dtype=torch.int32)
    mask = torch.zeros(b, 1, sq, 2 * bs, dtype=torch.bool)
    mask[0, 0, :, 6:] = True
    out, lse = ops.npu_fused_infer_attention_score(q, kc, vc, atten_mask=mask, actual_seq_lengths_kv=[8, 5],
                                                   block_table=table, num_heads=h, scale=0.3, input_layout="BSH",
                                                   num_key_value_heads=kvh, block_size=bs)
    assert lse.shape == (1,)
    for bi, n_keys in ((0, 6), (1, 5)):
        k = kc[table[bi].long()].reshape(-1, kvh, d)[:n_keys]
        v = vc[table[bi].long()].reshape(-1, kvh, d)[:n_keys]
        for hi in range(h):
            qh = q[bi].view(sq, h, d)[:, hi]
            p = torch.softmax(qh @ k[:, hi // 2].T * 0.3, -1)
            torch.testing.assert_close(out[bi].view(sq, h, d)[:, hi], p @ v[:, hi // 2], atol=1e-5, rtol=1e-5)
    cache = torch.zeros(2, 3, 4, 5)
    ops.npu_scatter_nd_update_(cache, torch.tensor([[1, 2], [0, 0]]), torch.ones(2, 4, 5) * 7)
    assert cache[1, 2].eq(7).all() and cache[0, 0].eq(7).all() and cache.sum() == 2 * 20 * 7
    x, r, gam = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(8, generator=g)
    y, rstd, s = ops.npu_add_rms_norm(x, r, gam, 1e-6)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, (x + r) / (x + r).pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * gam)
    assert rstd.shape == (3, 1)
    torch.testing.assert_close(ops.npu_swiglu(torch.cat((x, r), -1), -1), torch.nn.functional.silu(x) * r)
    with pytest.raises(NotImplementedError):
        ops.npu_fused_infer_attention_score(q, kc, vc, block_table=table, num_heads=h, sparse_mode=2,
                                            num_key_value_heads=kvh, block_size=bs)
