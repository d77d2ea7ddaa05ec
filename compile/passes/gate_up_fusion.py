"""gate_proj / up_proj on one input -> one `gate_up_proj` linear + split.

New parameter `<...>.mlp.gate_up_proj.weight` = gate rows then up rows ([2I, H]); the
SwiGLU that follows reads the two halves of the one output (split views, no copy).
"""
from __future__ import annotations

from torch.export import ExportedProgram

from .linear_fusion import fuse_linears


def apply(ep: ExportedProgram) -> tuple[ExportedProgram, dict]:
    return fuse_linears(ep, ("gate_proj", "up_proj"), "gate_up_proj")
