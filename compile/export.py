"""torch.export of each stage at each bucket (docs/CONTRACTS.md gives the signatures)."""
from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from ..graphs.model import DecodeStage, InternVL, PrefillStage, VisionStage
from ..runtime.manifest import graph_shape
from .buckets import Buckets


def kv_cache_example(model: InternVL, buckets: Buckets, dtype, device, num_blocks: int = 8):
    llm = model.language_model
    attn = llm.layers[0].self_attn
    shape = (len(llm.layers), num_blocks, buckets.block_size, attn.kv_heads, attn.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def example_inputs(model: InternVL, buckets: Buckets, name: str, dtype, device) -> tuple:
    """Inputs of the right shapes and dtypes for graph `name` (values are placeholders)."""
    cfg = model.cfg
    i64 = dict(dtype=torch.long, device=device)
    stage, size = graph_shape(name)
    if stage == "vision":
        px = cfg.vision.image_size
        return (torch.zeros(size["n"], 3, px, px, dtype=dtype, device=device),)
    k, v = kv_cache_example(model, buckets, dtype, device)
    mb = size["c"] // buckets.block_size
    if stage == "prefill":
        t = size["t"]
        return (torch.zeros(t, **i64), torch.arange(t, **i64),
                torch.zeros(t, cfg.llm.hidden_size, dtype=dtype, device=device),
                torch.zeros(t, dtype=torch.bool, device=device), torch.zeros(t, **i64),
                torch.zeros(1, mb, **i64), torch.zeros(1, **i64), k, v)
    b = size["b"]
    return (torch.zeros(b, **i64), torch.zeros(b, **i64), torch.zeros(b, **i64), torch.zeros(b, mb, **i64), k, v)


def stage_module(model: InternVL, name: str) -> torch.nn.Module:
    if name.startswith("vision_"):
        return VisionStage(model)
    if name.startswith("prefill_"):
        return PrefillStage(model)
    return DecodeStage(model)


def export_graph(model: InternVL, buckets: Buckets, name: str, dtype, device) -> ExportedProgram:
    args = example_inputs(model, buckets, name, dtype, device)
    dynamic = None
    if not name.startswith("vision_"):
        # The pool's block count is chosen by the runtime from its memory budget.
        blocks = Dim("num_blocks", min=2, max=1 << 24)
        dynamic = [None] * (len(args) - 2) + [{1: blocks}, {1: blocks}]
    with torch.no_grad():
        return torch.export.export(stage_module(model, name), args, dynamic_shapes=dynamic, strict=False)
