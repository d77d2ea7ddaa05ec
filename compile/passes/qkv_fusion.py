"""q_proj / k_proj / v_proj on one input -> one `qkv_proj` linear + split.

Decode multiplies a handful of rows by each weight, so every linear is a pass over its
weight plus a kernel launch and a GEMV set-up; one [q + 2kv, H] weight reads the same
bytes in one kernel. New parameters: `<...>.self_attn.qkv_proj.weight` (rows: all q
heads, then k heads, then v heads, i.e. the canonical q, k, v weights concatenated) and
`.bias` for Qwen2. The ViT's `attn.qkv` is fused in the checkpoint already and is left alone.
"""
from __future__ import annotations

from torch.export import ExportedProgram

from .linear_fusion import fuse_linears


def apply(ep: ExportedProgram) -> tuple[ExportedProgram, dict]:
    return fuse_linears(ep, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
