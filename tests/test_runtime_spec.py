"""The typed runtime spec (runtime/spec.py): parsed once, every field checked, and checked against
the compiled graphs' recorded input signatures at load (runtime/buckets.py check_signatures)."""
import copy

import pytest

from internvl_aot.runtime.buckets import GraphKey
from internvl_aot.runtime.engine import Engine
from internvl_aot.runtime.errors import ArtifactError
from internvl_aot.runtime.spec import RuntimeSpec


@pytest.fixture(scope="module")
def loaded(tiny_artifact):
    from internvl_aot.runtime.artifact import load_artifact
    return load_artifact(tiny_artifact("internlm2_vit300m"))


def test_spec_round_trips_and_types(loaded):
    manifest = loaded[0]
    spec = RuntimeSpec.from_dict(manifest)
    assert spec.to_dict() == {k: manifest[k] for k in spec.to_dict()}
    assert spec.buckets.block_size == manifest["buckets"]["block_size"] and spec.llm.num_layers == 2
    assert spec.rank_kv_heads == manifest["rank"]["kv_heads"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("rank"), "incomplete or malformed"),
    (lambda m: m.__setitem__("dtype", "int4"), "int4"),
    (lambda m: m["buckets"].__setitem__("context", [2040]), "multiple of block_size"),
    (lambda m: m["rank"].__setitem__("kv_heads", 99), "KV heads"),
])
def test_bad_manifest_fields_are_refused_with_the_field(loaded, edit, message):
    m = copy.deepcopy(loaded[0])
    edit(m)
    with pytest.raises(ArtifactError, match=message):
        RuntimeSpec.from_dict(m)


def test_graphs_that_disagree_with_the_manifest_are_refused(loaded):
    manifest, graphs, tok, dev = loaded
    sig = graphs[GraphKey("decode", 1, 2048).name()].input_signature
    assert sig[-1][2][2] == manifest["buckets"]["block_size"]       # the KV pool's block dimension, as compiled
    m = copy.deepcopy(manifest)
    m["buckets"]["block_size"] = 32
    with pytest.raises(ArtifactError, match="does not match its graphs"):
        Engine(m, graphs, tok, dev)
    m = copy.deepcopy(manifest)
    m["rank"]["kv_heads"] = 1
    with pytest.raises(ArtifactError, match="kv_cache"):
        Engine(m, graphs, tok, dev)
    Engine(manifest, graphs, tok, dev)                                  # the real one loads
