"""RoPE cos/sin from a precomputed table instead of trigonometry in every step.

graphs/rotary.py computes, from the token positions [N] (int64):

    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = cat((freqs, freqs), -1);  cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

This pass evaluates exactly those ops once for positions 0..max_context-1 and puts the
results in the program as two non-persistent buffers, `<rotary>.cos_table` and
`<rotary>.sin_table` (`<rotary>.long_cos_table` / `long_sin_table` for LongRoPE's second
frequency buffer `long_inv_freq`; the per-sequence choice between them stays in the graph) ([max_context, head_dim], model dtype, next to `<rotary>.inv_freq`,
which leaves the program); the graph then reads `index_select(table, 0, positions)`.

max_context is the graph's block-table width x block size (the most keys a sequence can
have in that graph, so every valid position is < max_context), or the `max_context`
argument. Graphs with the same max context (prefill and decode at the largest context
bucket) get equal tables, which compile/aoti.py stores once (non-parameter constants are
keyed by FQN and content digest).
"""
from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from .program_edit import (ProgramEditor, TensorCache, aten, cast_dtype, input_fqn, input_specs_by_name, is_op,
                           real_users, val)

_TABLES = TensorCache()


def count(ep: ExportedProgram) -> int:
    """cos/sin computations from an inv_freq buffer left in the program."""
    specs = input_specs_by_name(ep)
    return sum(len(m["outs"]) for m in (_match(specs, n) for n in ep.graph.nodes) if m is not None)


def apply(ep: ExportedProgram, max_context: int | None = None) -> tuple[ExportedProgram, dict]:
    ed = ProgramEditor(ep)
    matches = [m for m in (_match(ed.specs, n) for n in ed.graph.nodes) if m is not None]
    if not matches:
        return ep, {"replaced": 0}
    if max_context is None:
        max_context = graph_max_context(ed)
    if max_context is None:
        return ep, {"replaced": 0, "skipped": "no block table / KV cache input to size the table; pass max_context"}
    tables: dict[str, object] = {}
    for m in matches:
        _rewrite(ed, max_context, tables, **m)
    return ed.finish(), {"replaced": len(matches), "max_context": max_context, "tables": sorted(tables)}


def graph_max_context(ed: ProgramEditor) -> int | None:
    """Block-table width x block size, from the stage inputs (docs/CONTRACTS.md names)."""
    table = ed.user_input("block_tables", "block_table")
    cache = ed.user_input("k_cache")
    if table is None or cache is None:
        return None
    width, block = val(table).shape[-1], val(cache).shape[2]
    if not isinstance(width, int) or not isinstance(block, int):
        return None
    return width * block


def _match(specs, mul) -> dict | None:
    """mul(unsqueeze(positions.to(fp32), 1), unsqueeze(inv_freq, 0)) -> cat([m, m], -1) -> cos / sin."""
    if not is_op(mul, aten.mul.Tensor) or len(mul.args) != 2:
        return None
    pos_u, inv_u = mul.args
    if is_op(inv_u, aten.unsqueeze.default) and is_op(pos_u, aten.unsqueeze.default) and inv_u.args[1] != 0:
        pos_u, inv_u = inv_u, pos_u
    if not (is_op(inv_u, aten.unsqueeze.default) and inv_u.args[1] == 0
            and is_op(pos_u, aten.unsqueeze.default) and pos_u.args[1] == 1):
        return None
    inv_freq = inv_u.args[0]
    if input_fqn(specs, inv_freq, InputKind.BUFFER, InputKind.CONSTANT_TENSOR) is None or val(inv_freq).dim() != 1:
        return None
    pos_f = pos_u.args[0]
    if cast_dtype(pos_f) != torch.float32:
        return None
    positions = pos_f.args[0]
    vp = val(positions)
    if vp.dim() != 1 or vp.dtype.is_floating_point or vp.dtype.is_complex:
        return None
    users = real_users(mul)
    if len(users) != 1 or not is_op(users[0], aten.cat.default):
        return None
    cat = users[0]
    if list(cat.args[0]) != [mul, mul] or (cat.args[1] if len(cat.args) > 1 else 0) not in (-1, 1):
        return None
    outs = {}
    for trig in real_users(cat):
        if not is_op(trig, aten.cos.default, aten.sin.default):
            return None
        casts = real_users(trig)
        out = casts[0] if len(casts) == 1 and cast_dtype(casts[0]) is not None else trig
        outs[trig.target] = (out, val(out).dtype)
    if not outs:
        return None
    return dict(inv_freq=inv_freq, positions=positions, outs=outs, anchor=mul)


def _rewrite(ed: ProgramEditor, max_context: int, tables: dict, inv_freq, positions, outs, anchor) -> None:
    """tables: FQN -> placeholder of the tables added so far (one per rotary buffer and dtype)."""
    inv = ed.tensor(inv_freq)
    base, _, leaf = ed.fqn(inv_freq).rpartition(".")
    # `inv_freq` -> cos_table / sin_table; another frequency buffer of the same module (LongRoPE's
    # `long_inv_freq`) -> long_cos_table / long_sin_table, so the two never share a table.
    stem = leaf[:-len("inv_freq")] if leaf.endswith("inv_freq") else leaf + "_"
    for trig, (out, dtype) in outs.items():
        kind = "cos" if trig is aten.cos.default else "sin"
        fqn = f"{base}.{stem}{kind}_table" if base else f"rope_{stem}{kind}_table"
        if fqn not in tables:
            table = _TABLES.get(fqn, [inv], lambda: _table(inv, max_context, trig, dtype, val(positions).dtype),
                                extra_key=(max_context, dtype, val(positions).dtype))
            tables[fqn] = ed.add_buffer(fqn, table, before=inv_freq)
        node = tables[fqn]
        if val(node).dtype != dtype:
            raise ValueError(f"{fqn}: the graph computes RoPE tables in two dtypes from one inv_freq")
        with ed.graph.inserting_before(out):
            new = ed.call(aten.index_select.default, (node, 0, positions), like=anchor)
        out.replace_all_uses_with(new)
    ed.drop_input_if_unused(inv_freq)


def _table(inv_freq: torch.Tensor, max_context: int, trig, dtype: torch.dtype, pos_dtype) -> torch.Tensor:
    """The graph's own ops, run eagerly for positions 0..max_context-1."""
    positions = torch.arange(max_context, dtype=pos_dtype, device=inv_freq.device)
    freqs = aten.mul.Tensor(aten.unsqueeze.default(aten.to.dtype(positions, torch.float32), 1),
                            aten.unsqueeze.default(inv_freq, 0))
    emb = aten.cat.default([freqs, freqs], -1)
    return aten.to.dtype(trig(emb), dtype).contiguous()
