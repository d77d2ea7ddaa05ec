"""Shared pytest fixtures: tiny random InternVL checkpoints in every supported format.

- `tiny_checkpoints`: dict spec name -> tiny_checkpoints.TinyCheckpoint (built once per session);
  `.hf_dir`, `.original_dirs[flavour]`, `.image_token_id`, `.load_hf_model()`.
- `tiny_checkpoint`: the same, parametrized over every spec.
- `tiny_hf_model(name)`: the transformers InternVLForConditionalGeneration of a spec
  (fp32, eval, weights checked against the file), cached per session.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_checkpoints import SPECS, build_all  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("tiny_checkpoints"))


@pytest.fixture(scope="session", params=list(SPECS))
def tiny_checkpoint(request, tiny_checkpoints):
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_checkpoints):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny_checkpoints[name].load_hf_model()
        return cache[name]

    return get
