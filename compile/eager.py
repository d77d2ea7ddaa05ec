"""The engine over the eager graph modules, for tests and for eager-vs-artifact comparisons.

Each bucket name maps to the stage module itself, so the runtime's padding, chunking and
paged-cache code runs unchanged; only the graphs are not compiled.
"""
from __future__ import annotations

import torch

from ..graphs.config import ModelConfig
from ..graphs.model import build_model
from ..runtime.engine import Engine
from ..runtime.manifest import DTYPES
from ..runtime.tokenizer import Tokenizer
from .buckets import Buckets
from .export import stage_module
from .spec import build_spec



def eager_engine(cfg: ModelConfig, weights: dict, tokenizer_dir, buckets: Buckets | None = None,
                 dtype: str = "fp32", kv_cache_gb: float | None = None) -> Engine:
    buckets = buckets or Buckets()
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    spec = build_spec(cfg, buckets, dtype, tokenizer)
    weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    model = build_model(cfg, weights, max_seq_len=buckets.max_context)
    graphs = {name: stage_module(model, name) for name in buckets.graph_names()}
    return Engine(spec, graphs, tokenizer, "cpu", kv_cache_gb=kv_cache_gb)
