"""BACKEND=npu: the Ascend NPU graph variant, exported per bucket through torchair (issue 21).

torch_npu and torchair are imported only inside functions of this module.
"""
from __future__ import annotations

import torch

from ...graphs.config import ModelConfig
from ...graphs.model import build_model
from ...graphs.npu_variant import to_npu_variant
from ...runtime.engine import Engine
from ...runtime.manifest import DTYPES
from ...runtime.tokenizer import Tokenizer
from ..buckets import Buckets
from ..export import stage_module
from ..spec import build_spec


def eager_npu_engine(cfg: ModelConfig, weights: dict, tokenizer_dir, buckets: Buckets | None = None,
                     dtype: str = "fp32", kv_cache_gb: float | None = None, ops=None) -> Engine:
    """compile/eager.py's eager_engine over the NPU graph variant (the CPU stand-ins by default):
    the runtime's padding, chunking and paged-cache code runs unchanged on it."""
    buckets = buckets or Buckets()
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    spec = build_spec(cfg, buckets, dtype, tokenizer)
    weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    model = to_npu_variant(build_model(cfg, weights, max_seq_len=buckets.max_context), ops)
    graphs = {name: stage_module(model, name) for name in buckets.graph_names()}
    return Engine(spec, graphs, tokenizer, "cpu", kv_cache_gb=kv_cache_gb)
