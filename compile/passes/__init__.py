"""Fusion passes over exported FX graphs, applied in order before AOTInductor lowering.

Each pass is one module with `apply(ep) -> (ep, report)`; `report` says what it changed.
"""
from __future__ import annotations

from torch.export import ExportedProgram

PASS_ORDER: list[str] = []


def run_passes(ep: ExportedProgram, names: list[str] | None = None) -> tuple[ExportedProgram, dict]:
    import importlib
    reports = {}
    for name in (PASS_ORDER if names is None else names):
        mod = importlib.import_module(f"{__name__}.{name}")
        ep, reports[name] = mod.apply(ep)
    return ep, reports
