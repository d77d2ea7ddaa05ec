"""compile/aoti.py + runtime/graph_loader.py: weight-free packages sharing one set of weights.

A toy decoder (embedding, linears of 1024, a paged KV pool written in place at slot_mapping,
num_blocks dynamic) is exported at two batch buckets and compiled once for the module.
"""
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from internvl_aot.compile.aoti import compile_graphs, merged_extra_weights
from internvl_aot.runtime.graph_loader import GraphLoadError, load_graph, load_weights

V, H, LAYERS, KV, HD, BLOCK = 8192, 1024, 2, 2, 8, 4
BUCKETS = (2, 4)  # batch sizes, one graph each


class ToyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)  # 32 MB, also the (tied) output head
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList()
        for _ in range(LAYERS):  # ~20 MB each
            layer = nn.Module()
            layer.norm = nn.Parameter(torch.rand(H) + 0.5)
            layer.attn_in = nn.Linear(H, H)
            layer.k_proj = nn.Linear(H, KV * HD)
            layer.v_proj = nn.Linear(H, KV * HD)
            layer.o_proj = nn.Linear(KV * HD, H)
            layer.up = nn.Linear(H, 2 * H)
            layer.down = nn.Linear(2 * H, H)
            self.layers.append(layer)
        # Not in the state dict: a non-persistent buffer and a lifted plain-tensor constant.
        self.register_buffer("rope_cos", torch.cos(torch.arange(64.0)[:, None] * torch.rand(HD)), persistent=False)
        self.head_scale = torch.linspace(0.5, 1.5, H)

    def forward(self, input_ids, positions, slot_mapping, k_cache, v_cache):
        b = input_ids.shape[0]
        x = self.embed(input_ids)
        rope = self.rope_cos[positions][:, None, :]
        for i, layer in enumerate(self.layers):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.norm
            h = layer.attn_in(h)
            k = layer.k_proj(h).view(b, KV, HD) * rope
            v = layer.v_proj(h).view(b, KV, HD)
            k_cache[i].view(-1, KV, HD).index_copy_(0, slot_mapping, k)
            v_cache[i].view(-1, KV, HD).index_copy_(0, slot_mapping, v)
            ctx = (k_cache[i] * v_cache[i]).mean(dim=(0, 1))  # reads the whole (dynamic) pool
            x = x + layer.o_proj((v + ctx).reshape(b, KV * HD))
            x = x + layer.down(torch.nn.functional.silu(layer.up(x)))
        return (x * self.head_scale) @ self.embed.weight.T


def make_inputs(batch, num_blocks, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (batch,), generator=g)
    positions = torch.randint(0, 64, (batch,), generator=g)
    slots = torch.randperm(num_blocks * BLOCK, generator=g)[:batch]
    pool = (LAYERS, num_blocks, BLOCK, KV, HD)
    return ids, positions, slots, torch.randn(pool, generator=g), torch.randn(pool, generator=g)


def clone_all(args):
    return [a.clone() for a in args]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = ToyDecoder().eval()
    num_blocks = torch.export.Dim("num_blocks", min=2, max=1 << 16)
    pool = {1: num_blocks}
    programs = {}
    with torch.no_grad():
        for b in BUCKETS:
            programs[f"toy_b{b}"] = torch.export.export(
                model, tuple(make_inputs(b, 8, seed=b)), dynamic_shapes=(None, None, None, pool, pool)
            )
    out = tmp_path_factory.mktemp("artifact")
    messages = []
    compiled = compile_graphs(programs, out, progress=messages.append)
    extra = merged_extra_weights(compiled)
    weights_path = out / "weights.safetensors"
    save_file({**model.state_dict(), **extra}, str(weights_path))
    return model, out, compiled, weights_path, messages


@pytest.fixture()
def loaded(artifact):
    _, out, compiled, weights_path, _ = artifact
    weights = load_weights(weights_path)
    graphs = {n: load_graph(out / g.package, weights, g.constants) for n, g in compiled.items()}
    return weights, graphs


def test_constant_map_covers_state_dict_and_extra_constants(artifact):
    model, _, compiled, _, messages = artifact
    assert len(messages) == len(BUCKETS)
    for graph in compiled.values():
        keys = set(graph.constants.values())
        assert set(model.state_dict()) <= keys  # parameters bound by their own FQN
        extra = keys - set(model.state_dict())
        # rope_cos (non-persistent buffer) and head_scale (lifted constant) go to the weights file
        assert len(extra) == 2 and extra == set(graph.extra_weights)
    # identical tables of the two buckets are stored once
    assert len(merged_extra_weights(compiled)) == 2


@pytest.mark.parametrize("num_blocks", [5, 11])
def test_outputs_and_cache_writes_match_eager(artifact, loaded, num_blocks):
    model = artifact[0]
    _, graphs = loaded
    for b in BUCKETS:
        args = make_inputs(b, num_blocks, seed=100 + b + num_blocks)
        ref_args, got_args = clone_all(args), clone_all(args)
        k_pool = got_args[3]
        with torch.no_grad():
            ref = model(*ref_args)
        got = graphs[f"toy_b{b}"](*got_args)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # the pool given to the graph was written in place, exactly as eager wrote it
        assert got_args[3] is k_pool
        torch.testing.assert_close(got_args[3], ref_args[3], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_args[4], ref_args[4], atol=1e-5, rtol=1e-5)
        flat = got_args[3].view(LAYERS, -1, KV, HD)
        written = torch.zeros(flat.shape[1], dtype=torch.bool)
        written[args[2]] = True
        assert not torch.equal(flat[:, written], args[3].view(LAYERS, -1, KV, HD)[:, written])
        assert torch.equal(flat[:, ~written], args[3].view(LAYERS, -1, KV, HD)[:, ~written])


def test_packages_hold_no_weights(artifact):
    model, out, compiled, weights_path, _ = artifact
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert weight_bytes > 60e6
    for graph in compiled.values():
        size = os.path.getsize(out / graph.package)
        assert size == graph.package_bytes and size < weight_bytes / 20, (size, weight_bytes)
        names = zipfile.ZipFile(out / graph.package).namelist()
        assert not [n for n in names if "/data/weights/" in n or "/data/constants/" in n]


def test_weight_mutation_reaches_every_graph(artifact, loaded):
    model = artifact[0]
    weights, graphs = loaded
    args = {b: make_inputs(b, 6, seed=7 * b) for b in BUCKETS}
    before = {b: graphs[f"toy_b{b}"](*clone_all(args[b])) for b in BUCKETS}
    weights["layers.1.down.bias"].add_(0.25)  # in place, on the one shared tensor
    weights["embed.weight"][:, :8].mul_(3.0)
    for b in BUCKETS:
        after = graphs[f"toy_b{b}"](*clone_all(args[b]))
        assert (after - before[b]).abs().max() > 1e-2
        with torch.no_grad():
            m = ToyDecoder()
            m.load_state_dict({k: v for k, v in weights.items() if not k.startswith("_aoti.")})
            m.rope_cos, m.head_scale = model.rope_cos, model.head_scale
            torch.testing.assert_close(after, m(*clone_all(args[b])), atol=1e-5, rtol=1e-5)


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from internvl_aot.runtime.graph_loader import load_graph, load_weights

    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

    spec = json.loads(sys.argv[1])
    torch.ones(8) @ torch.ones(8)  # initialise the CPU backends before the baseline
    base = rss()
    weights = load_weights(spec["weights"])
    graphs = [load_graph(p, weights, c) for p, c in spec["graphs"]]
    for g, batch in zip(graphs, spec["batches"]):
        n = 8
        pool = torch.zeros(spec["layers"], n, 4, 2, 8)
        g(torch.arange(batch), torch.arange(batch), torch.arange(batch), pool, pool.clone())
    print(json.dumps({"growth": rss() - base, "weight_bytes": sum(t.nbytes for t in weights.values())}))
    """
)


def test_resident_memory_counts_weights_once(artifact):
    _, out, compiled, weights_path, _ = artifact
    spec = {
        "weights": str(weights_path),
        "graphs": [[str(out / g.package), g.constants] for g in compiled.values()],
        "batches": list(BUCKETS),
        "layers": LAYERS,
    }
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(spec)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    growth, wb = r["growth"], r["weight_bytes"]
    print(f"RSS growth {growth / 1e6:.1f} MB for {wb / 1e6:.1f} MB of weights and {len(compiled)} graphs")
    # every weight page was touched (the tied head reads the whole embedding) ...
    assert growth > 0.9 * wb
    # ... and counted once, not once per graph
    assert growth < 1.4 * wb


def _rewrite_info(src, dst, **changes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/extra/internvl_aot_graph.json"):
                data = json.dumps({**json.loads(data), **changes}).encode()
            zout.writestr(item, data)


def test_clear_errors(artifact, tmp_path):
    _, out, compiled, weights_path, _ = artifact
    graph = next(iter(compiled.values()))
    weights = load_weights(weights_path)
    pkg = out / graph.package

    with pytest.raises(GraphLoadError, match="not found"):
        load_graph(tmp_path / "missing.pt2", weights)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(pkg.read_bytes()[: os.path.getsize(pkg) // 2])
    with pytest.raises(GraphLoadError, match="corrupt or truncated"):
        load_graph(truncated, weights)
    other_torch = tmp_path / "other_torch.pt2"
    _rewrite_info(pkg, other_torch, torch_version="2.9.1+cu128")
    with pytest.raises(GraphLoadError, match="built by torch 2.9.1"):
        load_graph(other_torch, weights)
    with pytest.raises(GraphLoadError, match="absent from the weights file"):
        load_graph(pkg, {k: v for k, v in weights.items() if k != "layers.0.up.weight"})
    with pytest.raises(GraphLoadError, match="compiled for"):
        load_graph(pkg, {**weights, "layers.0.up.bias": torch.zeros(3)})
    with pytest.raises(GraphLoadError, match="not found"):
        load_weights(tmp_path / "none.safetensors")

    g = load_graph(pkg, weights)  # the constant map stored in the package suffices
    b = int(graph.name.removeprefix("toy_b"))
    args = make_inputs(b, 4, seed=1)
    with pytest.raises(ValueError, match="input input_ids"):
        g(args[0].int(), *args[1:])
    with pytest.raises(TypeError):
        g(*args[:4])
