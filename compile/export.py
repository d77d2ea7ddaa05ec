"""torch.export of each stage at each bucket (docs/CONTRACTS.md gives the signatures)."""
from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from ..graphs.model import DecodeStage, InternVL, PrefillStage, VisionStage
from ..runtime.buckets import BLOCK_TABLE_INPUT, GraphKey, graph_inputs
from .buckets import Buckets


def kv_cache_example(model: InternVL, buckets: Buckets, dtype, device, num_blocks: int = 8):
    llm = model.language_model
    attn = llm.layers[0].self_attn
    shape = (len(llm.layers), num_blocks, buckets.block_size, attn.kv_heads, attn.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def _input_specs(model: InternVL, buckets: Buckets, key: GraphKey, dtype) -> list:
    cfg = model.cfg
    return graph_inputs(key, hidden=cfg.llm.hidden_size, image_size=cfg.vision.image_size,
                        block_size=buckets.block_size, dtype=dtype)


def example_inputs(model: InternVL, buckets: Buckets, name: str, dtype, device) -> tuple:
    """Inputs of the right shapes and dtypes for graph `name` (values are placeholders)."""
    key = GraphKey.parse(name)
    args = tuple(torch.arange(shape[0], device=device) if n == "positions" else
                 torch.zeros(shape, dtype=dt, device=device)
                 for n, dt, shape in _input_specs(model, buckets, key, dtype))
    return args if key.stage == "vision" else args + kv_cache_example(model, buckets, dtype, device)


def stage_module(model: InternVL, name: str) -> torch.nn.Module:
    stage = GraphKey.parse(name).stage
    return {"vision": VisionStage, "prefill": PrefillStage, "decode": DecodeStage}[stage](model)


TOKEN_INPUTS = ("input_ids", "positions", "image_embeds", "image_mask", "slot_mapping")   # prefill dim 0


def export_graph(model: InternVL, buckets: Buckets, name: str, dtype, device,
                 dynamic_tables: bool = False, dynamic_tokens: bool = False) -> ExportedProgram:
    """dynamic_tables: the block table's width (blocks per sequence) is a dynamic dimension, at most
    the context bucket's blocks, so the runtime passes only the blocks in use and attention reads
    those (a static table makes every decode step attend over the whole context bucket: 2B, AMX box,
    a 40-token chat decoded 1.5x (batch 1) to 2x (batch 8) slower through the 4,096 graphs than
    through the 1,024 ones).
    dynamic_tokens: a prefill graph's chunk length is a dynamic dimension (2 .. its bucket's T), so a
    chunk of n tokens is computed as n rows, not padded to T (a 480-token prompt paid a 512-token chunk)."""
    args = example_inputs(model, buckets, name, dtype, device)
    key = GraphKey.parse(name)
    dynamic = None
    if key.stage != "vision":
        # The pool's block count is chosen by the runtime from its memory budget.
        blocks = Dim("num_blocks", min=2, max=1 << 24)
        dynamic = [None] * (len(args) - 2) + [{1: blocks}, {1: blocks}]
        width = key.context // buckets.block_size
        names = [n for n, _, _ in _input_specs(model, buckets, key, dtype)]
        if dynamic_tables and width >= 2:
            dynamic[names.index(BLOCK_TABLE_INPUT[key.stage])] = {1: Dim("table_blocks", min=1, max=width)}
        if dynamic_tokens and key.stage == "prefill" and key.size > 2:
            tokens = Dim("chunk_tokens", min=2, max=key.size)
            for n in TOKEN_INPUTS:
                dynamic[names.index(n)] = {0: tokens}
    with torch.no_grad():
        return torch.export.export(stage_module(model, name), args, dynamic_shapes=dynamic, strict=False)
