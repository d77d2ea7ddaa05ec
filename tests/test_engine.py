"""Engine behaviour on the eager graphs: preemption under a small KV pool, cancellation,
streaming, refusal of bad requests."""
import pytest
import torch

from conftest import checkpoint_dir
from internvl_aot.compile.buckets import Buckets
from internvl_aot.compile.checkpoint import load_checkpoint
from internvl_aot.compile.eager import eager_engine
from internvl_aot.runtime.engine import Request, RequestError
from internvl_aot.runtime.kv_cache import GiB, KVPool
from internvl_aot.runtime.sampler import SamplingParams
from internvl_aot.runtime.sequence import Status

BUCKETS = Buckets(vision=(1,), prefill=(32, 128), batch=(1, 2, 4), context=(2048,), block_size=16)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints):
    path = checkpoint_dir(tiny_checkpoints["llama_vit300m"], "internlm2")
    cfg, weights = load_checkpoint(path)
    return cfg, weights, path


def _reqs(n_new=(20, 25, 30)):
    qs = ["Tell me something.", "What is the capital of France? Answer briefly.", "Count to ten please."]
    return [Request(prompt=q, params=SamplingParams(max_new_tokens=n, ignore_eos=True)) for q, n in zip(qs, n_new)]


def test_preemption_under_a_small_pool_gives_the_same_tokens(ckpt):
    cfg, weights, path = ckpt
    roomy = eager_engine(cfg, weights, path, BUCKETS)
    reqs = _reqs((60, 70, 80))
    expected = [r.output_token_ids for r in roomy.generate(reqs)]
    # The smallest pool the engine accepts (one maximum-length sequence) cannot hold all three
    # prompts as they grow: the scheduler must preempt and recompute.
    small = Buckets(vision=(1,), prefill=(32, 128), batch=(1, 2, 4), context=(512,), block_size=16)
    lengths = [len(roomy.make_sequence(r)) + r.params.max_new_tokens for r in reqs]
    blocks = 512 // 16 + 1
    assert sum(-(-n // 16) for n in lengths) > blocks - 1 and max(lengths) <= 512
    per_block = KVPool.bytes_per_block(cfg.llm.num_layers, cfg.llm.num_kv_heads, cfg.llm.head_dim,
                                       BUCKETS.block_size, torch.float32)
    tight = eager_engine(cfg, weights, path, small, kv_cache_gb=blocks * per_block / GiB)
    assert tight.allocator.num_blocks == blocks
    preempted = []
    orig = tight.scheduler._preempt
    tight.scheduler._preempt = lambda seq: (preempted.append(seq.seq_id), orig(seq))
    got = [r.output_token_ids for r in tight.generate(reqs)]
    assert preempted, "the pool was meant to be too small for all three sequences at once"
    assert got == expected
    assert tight.allocator.num_free_blocks == blocks - 1


def test_prefill_across_context_buckets_gives_the_same_tokens(ckpt):
    """A prompt longer than the smallest context bucket is prefilled in chunks whose graphs have
    different context widths (prefill_t32_c64, then prefill_t32_c512): the same tokens as an
    engine with one context bucket, for a short prompt (all chunks in c64) and a long one."""
    cfg, weights, path = ckpt
    one = eager_engine(cfg, weights, path, BUCKETS)
    multi = eager_engine(cfg, weights, path, Buckets(vision=(1,), prefill=(32,), batch=(1, 2), context=(64, 512),
                                                     block_size=16))
    assert {"prefill_t32_c64", "prefill_t32_c512"} <= set(multi.runner.graphs)
    used = []
    for name in ("prefill_t32_c64", "prefill_t32_c512"):
        g = multi.runner.graphs[name]
        multi.runner.graphs[name] = lambda *a, _g=g, _n=name: (used.append(_n), _g(*a))[1]
    long_prompt = "Describe the history of the city in detail, please. " * 4
    reqs = [Request(prompt=p, params=SamplingParams(max_new_tokens=12, ignore_eos=True))
            for p in ("Hi there.", long_prompt)]
    assert len(multi.make_sequence(reqs[1])) > 64
    assert [r.output_token_ids for r in multi.generate(reqs)] == [r.output_token_ids for r in one.generate(reqs)]
    assert used.count("prefill_t32_c64") >= 3 and used.count("prefill_t32_c512") >= 1


def test_cancel_frees_blocks_and_others_continue(ckpt):
    cfg, weights, path = ckpt
    engine = eager_engine(cfg, weights, path, BUCKETS)
    seqs = [engine.add(r) for r in _reqs()]
    for _ in range(3):
        engine.step()
    assert all(s.status is Status.RUNNING for s in seqs)
    engine.cancel(seqs[1])
    assert seqs[1].finish_reason == "cancelled" and seqs[1].seq_id not in engine.allocator
    engine.run_until_done([seqs[0], seqs[2]])
    assert [len(s.output_ids) for s in (seqs[0], seqs[2])] == [20, 30]
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks - 1


def test_streamed_text_equals_final_text(ckpt):
    cfg, weights, path = ckpt
    engine = eager_engine(cfg, weights, path, BUCKETS)
    stream = engine.tokenizer.stream(skip_special_tokens=True)
    pieces = []
    res = engine.generate([Request(prompt="你好，世界 😀 hello", params=SamplingParams(max_new_tokens=24))],
                          on_token=lambda s, t: pieces.append(stream.feed(t)))[0]
    pieces.append(stream.finish())
    assert "".join(pieces) == engine.tokenizer.decode(res.output_token_ids, skip_special_tokens=True)
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in res.text


def test_bad_requests_are_refused_before_any_work(ckpt, tmp_path):
    cfg, weights, path = ckpt
    engine = eager_engine(cfg, weights, path, BUCKETS)
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG garbage")
    good = tmp_path / "ok.png"
    from PIL import Image
    Image.new("RGB", (64, 64), "red").save(good)
    with pytest.raises(RequestError, match="x.png"):
        engine.generate([Request(prompt="hi", images=[str(bad)])])
    with pytest.raises(RequestError, match="placeholder"):
        engine.generate([Request(prompt="<image> and <image>", images=[str(good)])])
    with pytest.raises(RequestError, match="IMG_CONTEXT"):
        engine.generate([Request(prompt="<IMG_CONTEXT> typed by hand")])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert not engine.scheduler.has_work()


def test_interleaved_prefill_bounds_the_decode_stall_and_keeps_the_tokens(ckpt):
    """With prefill_chunks_per_decode=1 a long prompt arriving while another sequence decodes is
    prefilled one chunk per step with a decode step between chunks (nano-vllm's split: the
    scheduler plans, the engine executes and reports each step), and every sequence gets the
    same tokens as when it runs alone."""
    cfg, weights, path = ckpt
    alone = eager_engine(cfg, weights, path, BUCKETS)
    short = Request(prompt="Count to ten please.", params=SamplingParams(max_new_tokens=30, ignore_eos=True))
    long_ = Request(prompt="Describe the history of the city in detail, please. " * 12,
                    params=SamplingParams(max_new_tokens=10, ignore_eos=True))
    expected = [alone.generate([r])[0].output_token_ids for r in (short, long_)]

    mixed = eager_engine(cfg, weights, path, BUCKETS)
    mixed.scheduler.prefill_chunks_per_decode = 1
    a = mixed.add(short)
    records = []
    while len(a.output_ids) < 5:
        records.append(mixed.step())
    b = mixed.add(long_)
    assert len(b) > 3 * 128
    mixed.run_until_done([a, b], on_step=records.append)
    assert [a.output_ids, b.output_ids] == expected
    kinds = [r.kind for r in records]
    b_chunks = [i for i, r in enumerate(records) if r.kind == "prefill" and r.seq_ids == [b.seq_id]]
    assert len(b_chunks) >= 4
    # between two chunks of the long prompt, the running sequence decoded once
    assert all(kinds[i + 1] == "decode" for i in b_chunks[:-1])
    assert all(r.new_tokens == len(r.seq_ids) for r in records if r.kind == "decode")
    assert sum(r.new_tokens for r in records) == len(a.output_ids) + len(b.output_ids)


def test_step_records_in_offline_order(ckpt):
    """Offline (prefill_chunks_per_decode=None): every prompt is prefilled before the first decode step."""
    cfg, weights, path = ckpt
    engine = eager_engine(cfg, weights, path, BUCKETS)
    seqs = [engine.add(r) for r in _reqs((3, 3, 3))]
    records = []
    engine.run_until_done(seqs, on_step=records.append)
    first_decode = next(i for i, r in enumerate(records) if r.kind == "decode")
    assert all(r.kind == "prefill" for r in records[:first_decode])
    assert {s for r in records[:first_decode] for s in r.seq_ids} == {s.seq_id for s in seqs}
    assert engine.step() is None and not engine.scheduler.has_work()
