"""Tensor parallelism: sharding, numerics, a compiled TP=2 artifact, and failure handling.

- Which TP sizes each registry model takes, and the shard shapes of every real model at 2/4/8
  (on the meta device: no memory, no time).
- Numerics, eagerly, with real processes and gloo: the engine with its graphs as eager
  modules, rank 0 in this process and the other ranks started by runtime/tp.py running this
  file as a follower, against the TP=1 eager engine: InternLM2 (4 query / 2 KV heads; at TP=4
  the KV heads are replicated), vocabularies that do and do not divide by the world size,
  both ViT kinds, Llama and Qwen2 backbones, TP=2 and TP=4, a mixed batch with several
  images and text-only prompts. Plus a model with zero-padded ViT heads (3 heads at TP=2/4).
- One compiled TP=2 artifact (the InternLM2 / 300M tiny checkpoint): the same greedy tokens as
  the TP=1 artifact, through the Engine API and internvl-run.
- A rank killed mid-generation ends the run within 10 s naming the rank; Ctrl-C and a killed
  rank 0 leave no process behind; a MASTER_PORT in use is a clear error.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import ARTIFACT_BUCKETS, ARTIFACT_CASES, checkpoint_dir, compile_tiny  # noqa: E402
from internvl_aot.compile.buckets import Buckets  # noqa: E402
from internvl_aot.compile.checkpoint import canonical_shapes, load_checkpoint, random_weights  # noqa: E402
from internvl_aot.compile.export import stage_module  # noqa: E402
from internvl_aot.compile.registry import list_models, registry_config, registry_entry  # noqa: E402
from internvl_aot.compile.spec import build_spec  # noqa: E402
from internvl_aot.compile.tp import check_tp, rank_shard, shard_weights, valid_tp_sizes  # noqa: E402
from internvl_aot.graphs.config import LLMConfig, ModelConfig, VisionConfig  # noqa: E402
from internvl_aot.graphs.model import DecodeStage, PrefillStage, VisionStage, build_model  # noqa: E402
from internvl_aot.graphs.parallel import TPInfo  # noqa: E402
from internvl_aot.runtime.engine import Engine, Request  # noqa: E402
from internvl_aot.runtime.sampler import SamplingParams  # noqa: E402
from internvl_aot.runtime.tokenizer import Tokenizer  # noqa: E402
from internvl_aot.runtime.tp import RankGroup, TPError  # noqa: E402

CPU = torch.device("cpu")


def _image(seed, w, h):
    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


def _requests():
    def p(n):
        return SamplingParams(max_new_tokens=n, ignore_eos=True)
    return [Request(prompt="What is shown in this picture?", images=[_image(1, 700, 400)], max_tiles=2, params=p(12)),
            Request(prompt="Image-1: <image>\nImage-2: <image>\nCompare them.",
                    images=[_image(2, 300, 300), _image(3, 200, 900)], max_tiles=2, params=p(7)),
            Request(prompt="Hello, world! Please answer the question briefly.", params=p(16)),
            Request(prompt="Hi", params=p(4))]


# ================================================================ sizes and shapes

def test_tp_sizes_of_registry_models():
    for name in ("internvl2-2b", "internvl2-8b"):
        assert {1, 2, 4, 8} <= set(valid_tp_sizes(registry_config(name))), name
    for name in ("internvl-chat-v1-2", "internvl-chat-v1-5", "internvl2-26b", "internvl2-40b", "internvl2-76b"):
        assert {4, 8} <= set(valid_tp_sizes(registry_config(name))), name
    assert valid_tp_sizes(registry_config("internvl2-2b")) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError, match=r"TP=3 does not fit internvl2-2b: .*16 attention heads.*"
                                         r"TP values that work for this model: 1, 2, 4, 8, 16"):
        check_tp(registry_config("internvl2-2b"), 3)
    # Qwen2-0.5B: 14 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"TP values that work for this model: 1, 2, 14$"):
        check_tp(registry_config("internvl2-1b"), 4)


def _supported_models():
    return [m for m in list_models() if not registry_entry(m).unsupported]


@pytest.mark.parametrize("name", _supported_models())
def test_shards_build_every_rank_of_real_models(name):
    """Every rank's shard has exactly the shapes its modules expect (meta tensors: free)."""
    cfg = registry_config(name)
    weights = {k: torch.empty(s, device="meta") for k, s in canonical_shapes(cfg).items()}
    for n in (2, 4, 8):
        if n not in valid_tp_sizes(cfg):
            continue
        for r in sorted({0, n // 2, n - 1}):      # first, middle and last (zero-padded) rank
            model = build_model(cfg, rank_shard(cfg, weights, r, n), TPInfo(r, n, "0"))
            attn = model.vision_model.encoder.layers[0].attn
            assert attn.heads * n >= cfg.vision.num_heads            # InternViT-6B's 25 heads: padded
            lm = model.language_model
            assert lm.layers[0].self_attn.heads == cfg.llm.num_heads // n
            assert lm.layers[0].self_attn.kv_heads == max(1, cfg.llm.num_kv_heads // n)
            assert lm.lm_head.weight.shape[0] * n >= cfg.llm.vocab_size


def test_shards_put_heads_where_the_model_reads_them():
    """Rank r's q/k/v rows are its heads, KV heads replicated at TP > KV heads, vocab padded."""
    cfg = registry_config("internvl2-2b")
    d, c = cfg.llm.head_dim, cfg.vision.hidden_size
    q, k = "language_model.layers.0.self_attn.q_proj.weight", "language_model.layers.0.self_attn.k_proj.weight"
    emb, qkv = "language_model.embed_tokens.weight", "vision_model.encoder.layers.0.attn.qkv.weight"
    shapes = canonical_shapes(cfg)
    shapes[emb] = (cfg.llm.vocab_size, 1)                              # only the rows matter here
    w = {n: torch.arange(torch.Size(shapes[n]).numel(), dtype=torch.float32).reshape(shapes[n]) + 1
         for n in (q, k, emb, qkv)}
    shards = shard_weights(cfg, w, 16)                                 # 16 query heads, 8 KV heads
    for r, s in enumerate(shards):
        assert torch.equal(s[q], w[q][r * d:(r + 1) * d])
        assert torch.equal(s[k], w[k][(r // 2) * d:(r // 2 + 1) * d])   # query heads 2r, 2r+1 use KV head r // 2
    assert sum(s[emb].shape[0] for s in shards) == 92560               # 92553 padded to a multiple of 16
    assert torch.count_nonzero(shards[-1][emb][-7:]) == 0 and torch.count_nonzero(shards[-1][emb][:-7]) == 5785 - 7
    assert [int(s["language_model.embed_tokens.vocab_start"]) for s in shards[:3]] == [0, 5785, 11570]
    s1 = shards[1][qkv]
    assert torch.equal(s1[:64], w[qkv][64:128]) and torch.equal(s1[64:128], w[qkv][c + 64:c + 128])


# ================================================================ eager numerics, real processes

def _eager_setup(src: Path, tp: int, buckets: str):
    if src.name == "synthetic":
        cfg, weights = _synthetic()
        tok = None
        # a whole manifest's runtime fields (runtime/spec.py), with no tokenizer behind them
        spec = {"model": {"name": "synthetic", "config": cfg.to_dict()}, "dtype": "fp32",
                "buckets": Buckets.parse(buckets).to_dict(), "tp": tp,
                "rank": {"kv_heads": max(1, cfg.llm.num_kv_heads // tp)},
                "chat": {"template": "internlm2-chat", "system": ""},
                "image": {"image_size": 448, "num_image_token": 256, "dynamic_image_size": False,
                          "use_thumbnail": False, "min_dynamic_patch": 1, "max_dynamic_patch": 1},
                "generation": {"stop_token_ids": []}}
    else:
        cfg, weights = load_checkpoint(src)
        tok = Tokenizer.from_dir(src)
        spec = build_spec(cfg, Buckets.parse(buckets), "fp32", tok, TPInfo(0, tp, "0"))
    spec["tp_group"] = "0"
    spec["graphs"] = Buckets.parse(buckets).graph_names()
    return cfg, weights, tok, spec


def _model_hook(hook: str | None):
    """"module:function" -> the function (a name, so that the follower processes can import it too)."""
    if not hook:
        return None
    import importlib
    module, fn = hook.split(":")
    return getattr(importlib.import_module(module), fn)


def _rank_graphs(cfg, weights, rank: int, tp: int, buckets: str, model_hook: str | None = None) -> dict:
    import torch.distributed as dist
    b = Buckets.parse(buckets)
    model = build_model(cfg, rank_shard(cfg, weights, rank, tp), TPInfo(rank, tp, dist.group.WORLD.group_name),
                        max_seq_len=b.max_context)
    hook = _model_hook(model_hook)
    if hook is not None:
        hook(model)
    return {name: stage_module(model, name) for name in b.graph_names()}


def _follower_main(src, tp, rank, addr, port, buckets, parent, model_hook=None):
    """A follower rank running the eager graph modules (this file run as a script)."""
    from internvl_aot.runtime.tp_worker import follow, join_group, watch_parent
    watch_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    cfg, weights, _, spec = _eager_setup(Path(src), tp, buckets)
    store, channel = join_group(spec, rank, addr, port, CPU)
    graphs = _rank_graphs(cfg, weights, rank, tp, buckets, model_hook)
    store.set(f"loaded/{rank}", "ok")
    try:
        follow(graphs, spec, channel, CPU)
    finally:
        sys.stdout.flush()
        os._exit(0)


def eager_tp_group(src: Path, tp: int, buckets: str, model_hook: str | None = None):
    """-> (config, TP=1 weights, tokenizer, spec, rank 0's wrapped eager graphs, RankGroup).

    model_hook: "module:function" called on every rank's built model before its stage graphs are
    taken (tests/test_npu.py: "internvl_aot.graphs.npu_variant:to_npu_variant")."""
    cfg, weights, tok, spec = _eager_setup(src, tp, buckets)
    group = RankGroup(spec, CPU)
    argv = lambda r, addr, port: [sys.executable, __file__, "follower", str(src), str(tp), str(r), addr, str(port),  # noqa: E731
                                  buckets, str(os.getpid()), model_hook or ""]
    group.launch(argv, dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        graphs = _rank_graphs(cfg, weights, 0, tp, buckets, model_hook)
        group.wait_loaded()
    except BaseException:
        group.stop()
        raise
    return cfg, weights, tok, spec, group.wrap(graphs), group


EAGER_CASES = [
    ("llama_vit300m", "internlm2", 2),   # InternLM2: 4 query / 2 KV heads; vocab 329 padded to 330
    ("llama_vit300m", "internlm2", 4),   # one query head per rank, each KV head on two ranks; vocab -> 332
    ("llama_vit6b", "llama", 2),         # Llama backbone; InternViT-6B style: qk-norm over the full width
    ("llama_vit6b", "internlm2", 4),
    ("qwen2_vit300m", "qwen2", 2),       # Qwen2 backbone (q/k/v bias); vocab 312 divides
    ("qwen2_vit6b", "hf", 4),
]


@pytest.mark.parametrize("spec_name,fmt,tp", EAGER_CASES)
def test_eager_tp_tokens_equal_tp1(spec_name, fmt, tp, tiny_checkpoints):
    src = checkpoint_dir(tiny_checkpoints[spec_name], fmt)
    buckets = ARTIFACT_BUCKETS
    reqs = _requests()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, weights, tok, spec, graphs, group = eager_tp_group(Path(src), tp, buckets)
        with Engine(spec, graphs, tok, "cpu", tp_group=group) as engine:
            ours = engine.generate(reqs)
        ref = _eager_tp1(cfg, weights, src, buckets).generate(reqs)
    finally:
        torch.set_num_threads(threads)
    assert [r.num_tiles for r in ours] == [[3], [1, 3], [], []]
    for req, a, b in zip(reqs, ours, ref):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.output_token_ids == b.output_token_ids, (req.prompt, tp)
    assert _children() == []


def _eager_tp1(cfg, weights, src, buckets):
    from internvl_aot.compile.eager import eager_engine
    return eager_engine(cfg, weights, src, Buckets.parse(buckets))


def _synthetic():
    """InternViT-6B style with 3 heads (zero-padded to 4 at TP=2 and TP=4), widths that do not divide
    (ViT MLP 90, mlp1 / LLM hidden 38, LLM MLP 62), one KV head, vocabulary 101."""
    cfg = ModelConfig(name="synthetic",
                      vision=VisionConfig(hidden_size=48, num_layers=2, num_heads=3, intermediate_size=90,
                                          norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
                      llm=LLMConfig(arch="llama", vocab_size=101, hidden_size=38, num_layers=2, num_heads=4,
                                    num_kv_heads=1, head_dim=10, intermediate_size=62), ps_version="v1")
    return cfg, random_weights(cfg, torch.float32, seed=3)


@pytest.mark.parametrize("tp", [2, 4])
def test_padded_vit_heads_and_widths(tp, tmp_path):
    buckets = "vision=2;prefill=32;batch=2;context=128;block_size=16"
    src = tmp_path / "synthetic"
    cfg, weights, _, spec, graphs, group = eager_tp_group(src, tp, buckets)
    ref = build_model(cfg, weights, max_seq_len=128)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 448, 448)
    attn = ref.language_model.layers[0].self_attn
    shape = (2, 8, 16, attn.kv_heads, attn.head_dim)
    k1, v1 = torch.zeros(shape), torch.zeros(shape)
    kn = torch.zeros(2, 8, 16, spec["rank"]["kv_heads"], attn.head_dim)
    vn = torch.zeros_like(kn)
    t = 32
    ids = torch.randint(0, 101, (t,))
    mask = torch.zeros(t, dtype=torch.bool)
    mask[3:13] = True
    slots, table, last = torch.arange(t) + 16, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]]), torch.tensor([t - 1])
    dec = (torch.tensor([5, 9]), torch.tensor([t, 0]), torch.tensor([16 + t, 0]),
           torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0], [0] * 8]))
    try:
        group.allocate_pools(8)
        with torch.no_grad():
            emb_ref = VisionStage(ref)(pixels)
            emb = graphs["vision_n2"](pixels)
            img = torch.zeros(t, 38)
            img[3:13] = emb_ref[0, :10]
            pre_ref = PrefillStage(ref)(ids, torch.arange(t), img, mask, slots, table, last, k1, v1)
            pre = graphs["prefill_t32_c128"](ids, torch.arange(t), img, mask, slots, table, last, kn, vn)
            dec_ref = DecodeStage(ref)(*dec, k1, v1)
            out = graphs["decode_b2_c128"](*dec, kn, vn)
    finally:
        group.stop()
    for a, b in ((emb, emb_ref), (pre, pre_ref), (out, dec_ref)):
        assert a.shape == b.shape
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


# ================================================================ the compiled TP=2 artifact

TP_BUCKETS = "vision=1;prefill=128;batch=1,4;context=2048;block_size=16"


@pytest.fixture(scope="session")
def tp2_artifact(tiny_checkpoints, tmp_path_factory):
    spec, fmt = ARTIFACT_CASES["internlm2_vit300m"]
    logs = []
    out = compile_tiny(tiny_checkpoints[spec], fmt, tmp_path_factory.mktemp("tp_artifacts") / "internlm2_vit300m_tp2",
                       TP_BUCKETS, tp=2, log=logs.append)
    return out, logs


def _children(pid: int | None = None) -> list[int]:
    """Live (non-zombie) follower ranks whose parent is `pid` (default: this process)."""
    pid = pid or os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and ("tp_worker" in cmdline or "follower" in cmdline):
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_tp2_artifact_layout_and_collectives(tp2_artifact):
    art, logs = tp2_artifact
    m = json.loads((art / "manifest.json").read_text())
    assert m["tp"] == 2 and m["tp_group"] == "0" and m["rank"] == {"kv_heads": 1}
    assert [r["weights"] for r in m["ranks"]] == ["rank0/weights.safetensors", "rank1/weights.safetensors"]
    for r in (0, 1):
        assert sorted(p.name for p in (art / f"rank{r}" / "graphs").iterdir()) == sorted(f"{g}.pt2" for g in m["graphs"])
    # 2 layers: the embedding, attention output and MLP down projection per layer, the logits.
    assert m["compile"]["tp"]["collectives"]["decode_b4_c2048"] == {"all_reduce": 2 * 2 + 2}
    assert m["compile"]["tp"]["collectives"]["vision_n1"] == {"all_reduce": 2 * 2 + 1}
    assert m["compile"]["tp"]["reused_rank0_graphs"] == {"rank1": len(m["graphs"])}
    assert any("collectives per decode step: {'all_reduce': 6}" in line for line in logs)
    # The fusion passes ran on the sharded graphs.
    passes = m["compile"]["passes"]["decode_b1_c2048"]["passes"]
    assert passes["qkv_fusion"]["fused"] == 2 and passes["gate_up_fusion"]["fused"] == 2


def test_tp2_artifact_tokens_equal_tp1_artifact(tp2_artifact, tiny_artifact):
    reqs = _requests()
    with Engine.from_artifact(tp2_artifact[0]) as engine:
        assert len(_children()) == 1
        ours = engine.generate(reqs)
        again = engine.generate(reqs[2:3])[0]               # the group stays usable between calls
        assert engine.allocator.num_free_blocks == engine.allocator.num_blocks - 1
    ref = Engine.from_artifact(tiny_artifact("internlm2_vit300m")).generate(reqs)
    for req, a, b in zip(reqs, ours, ref):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.output_token_ids == b.output_token_ids, req.prompt
    assert again.output_token_ids == ours[2].output_token_ids
    assert _children() == []


def test_tp2_cli_json(tp2_artifact, tmp_path):
    art = tp2_artifact[0]
    img = tmp_path / "pic.png"
    _image(9, 900, 400).save(img)
    cmd = [sys.executable, "-m", "internvl_aot.runtime.cli", "--artifact", str(art), "--image", str(img), "--prompt",
           "What is this?", "--max-new-tokens", "6", "--max-tiles", "2", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    with Engine.from_artifact(art) as engine:
        expected = engine.generate([Request(prompt="What is this?", images=[str(img)], max_tiles=2,
                                            params=SamplingParams(max_new_tokens=6))])[0]
    assert out["output_token_ids"] == expected.output_token_ids and out["num_tiles"] == [3]


RUN_FOREVER = r"""
import signal, sys
# A shell's background job (a CI script's `cmd &`) starts with SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler; restore the terminal's behaviour that Ctrl-C relies on.
signal.signal(signal.SIGINT, signal.default_int_handler)
from internvl_aot.runtime.engine import Engine, Request
from internvl_aot.runtime.sampler import SamplingParams
from internvl_aot.runtime.tp import TPError
engine = Engine.from_artifact(sys.argv[1])
print("ready", flush=True)
def tick(seq, tok):
    print("token", flush=True)
try:
    while True:
        engine.generate([Request(prompt="Tell me a story.", params=SamplingParams(max_new_tokens=1000, ignore_eos=True))],
                        on_token=tick)
except TPError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
except KeyboardInterrupt:
    engine.close()
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
"""


def _start_forever(art, **kw):
    p = subprocess.Popen([sys.executable, "-c", RUN_FOREVER, str(art)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, **kw)
    deadline = time.monotonic() + 120
    tokens = 0
    while tokens < 5:
        line = p.stdout.readline()
        assert line, f"the run ended early: {p.stderr.read()}"
        tokens += line.startswith("token")
        assert time.monotonic() < deadline
    followers = _children(p.pid)
    assert len(followers) == 1
    return p, followers


def test_killed_rank_ends_the_run_within_10s(tp2_artifact):
    p, (follower,) = _start_forever(tp2_artifact[0])
    t0 = time.monotonic()
    os.kill(follower, signal.SIGKILL)
    _, err = p.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, err
    assert "tensor-parallel rank 1 died (signal SIGKILL" in err
    assert elapsed < 10, elapsed
    assert not _alive(follower)


def test_ctrl_c_stops_every_rank(tp2_artifact):
    p, (follower,) = _start_forever(tp2_artifact[0], start_new_session=True)
    os.killpg(p.pid, signal.SIGINT)                      # what a terminal's Ctrl-C does: the whole group
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    deadline = time.monotonic() + 10
    while _alive(follower) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(follower)


def test_killed_rank0_takes_the_followers_down(tp2_artifact):
    p, (follower,) = _start_forever(tp2_artifact[0])
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(follower) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(follower)


def test_master_port_in_use_is_a_clear_error(tp2_artifact, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        t0 = time.monotonic()
        with pytest.raises(TPError, match=rf"MASTER_PORT={port} on 127.0.0.1 is already in use"):
            Engine.from_artifact(tp2_artifact[0], skip_verify=True)
        assert time.monotonic() - t0 < 10
    assert _children() == []


def test_master_port_is_honoured(tp2_artifact, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_PORT", str(port))
    with Engine.from_artifact(tp2_artifact[0], skip_verify=True) as engine:
        assert engine.tp_group.store.port == port
        assert len(engine.generate([Request(prompt="Hi", params=SamplingParams(max_new_tokens=3,
                                                                              ignore_eos=True))])[0].output_token_ids) == 3


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "follower":
    _, _, src_, tp_, rank_, addr_, port_, buckets_, parent_, hook_ = sys.argv
    _follower_main(src_, int(tp_), int(rank_), addr_, int(port_), buckets_, int(parent_), hook_ or None)


def test_server_on_a_tp2_artifact(tp2_artifact, tiny_artifact):
    """internvl-serve starts the follower rank with the server, answers like the TP=1 artifact, and
    takes the rank down when it stops."""
    import httpx
    from internvl_aot.bench.serve import running_server
    with running_server(tp2_artifact[0]) as (proc, base):
        assert len(_children(proc.pid)) == 1
        q = "Tell me about the weather."
        ref = Engine.from_artifact(tiny_artifact("internlm2_vit300m")).generate(
            [Request(prompt=q, params=SamplingParams(max_new_tokens=12))])[0].text
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "m", "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": q}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref
        r = httpx.post(base + "/generate", timeout=60, json={"inputs": q, "parameters": {"max_new_tokens": 12}})
        assert r.json()["generated_text"] == ref
    deadline = time.time() + 10
    while _children(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert _children(proc.pid) == []
