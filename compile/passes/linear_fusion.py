"""Horizontal linear fusion: sibling `aten.linear` calls on one input -> one linear + split.

Shared by qkv_fusion (q/k/v_proj -> qkv_proj) and gate_up_fusion (gate/up_proj ->
gate_up_proj). Siblings are recognised by their parameters' names: linears whose weights
are `<module>.<member>.weight` for every member, with the same `<module>` and the same
input node. The fused weight is a new parameter `<module>.<fused>.weight` (and `.bias`
when every member has one), the rows of the members concatenated in member order, and
the members' parameters leave the program: the artifact stores the fused layout only.

Every graph exported from one model gets the *same* fused tensor object (TensorCache),
so the compile holds one copy, and every graph binds the same key with the same bytes.
"""
from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from .program_edit import ProgramEditor, TensorCache, aten, is_op

_FUSED = TensorCache()


def fuse_linears(ep: ExportedProgram, members: tuple[str, ...], fused: str) -> tuple[ExportedProgram, dict]:
    ed = ProgramEditor(ep)
    groups: dict[tuple, dict[str, list]] = {}
    for node in ed.graph.nodes:
        if not is_op(node, aten.linear.default) or node.kwargs:
            continue
        weight_fqn = ed.fqn(node.args[1], InputKind.PARAMETER)
        if weight_fqn is None or not weight_fqn.endswith(".weight"):
            continue
        module, _, member = weight_fqn[: -len(".weight")].rpartition(".")
        if member in members:
            groups.setdefault((node.args[0], module), {}).setdefault(member, []).append(node)

    fused_names, skipped = [], []
    for (x, module), found in groups.items():
        reason = _unfusable(ed, found, members)
        if reason:
            skipped.append(f"{module}: {reason}")
            continue
        fused_names.append(_fuse(ed, x, module, [found[m][0] for m in members], fused))
    report = {"fused": len(fused_names), "skipped": skipped}
    if not fused_names:
        return ep, report
    out = ed.finish()
    report["params_before"] = len(ep.state_dict)
    report["params_after"] = len(out.state_dict)
    report["example"] = fused_names[0]
    return out, report


def _unfusable(ed: ProgramEditor, found: dict, members: tuple[str, ...]) -> str | None:
    if set(found) != set(members):
        return f"only {sorted(found)} of {list(members)}"
    if any(len(v) != 1 for v in found.values()):
        return "a member is applied more than once to the same input"
    linears = [found[m][0] for m in members]
    weights = [ed.tensor(n.args[1]) for n in linears]
    if len({(w.dim(), w.shape[1:], w.dtype, w.device) for w in weights}) != 1 or weights[0].dim() != 2:
        return "weights differ in input features, dtype or device"
    has_bias = [len(n.args) > 2 and n.args[2] is not None for n in linears]
    if any(has_bias) and not all(has_bias):
        return "some members have a bias and some do not"
    if all(has_bias) and any(ed.fqn(n.args[2], InputKind.PARAMETER) is None for n in linears):
        return "a bias is not a parameter"
    return None


def _fuse(ed: ProgramEditor, x, module: str, linears: list, fused: str) -> str:
    w_nodes = [n.args[1] for n in linears]
    b_nodes = [n.args[2] for n in linears] if len(linears[0].args) > 2 and linears[0].args[2] is not None else []
    first_input = min(w_nodes + b_nodes, key=_position(ed))
    names = {"weight": w_nodes, "bias": b_nodes}
    new_inputs = []
    for kind, nodes in names.items():
        if not nodes:
            continue
        fqn = f"{module}.{fused}.{kind}"
        parts = [ed.tensor(n) for n in nodes]
        tensor = _FUSED.get(fqn, parts, lambda parts=parts: torch.nn.Parameter(
            torch.cat([p.detach() for p in parts], dim=0), requires_grad=False))
        new_inputs.append(ed.add_parameter(fqn, tensor, before=first_input))
    sizes = [int(ed.tensor(n).shape[0]) for n in w_nodes]
    first_linear = min(linears, key=_position(ed))
    with ed.graph.inserting_before(first_linear):
        y = ed.call(aten.linear.default, (x, *new_inputs), like=first_linear)
        split = ed.call(aten.split_with_sizes.default, (y, sizes, -1), like=first_linear)
        outs = [ed.call(operator.getitem, (split, i), like=first_linear) for i in range(len(linears))]
    for old, new in zip(linears, outs):
        old.replace_all_uses_with(new)
        ed.graph.erase_node(old)
    for n in w_nodes + b_nodes:
        ed.drop_input_if_unused(n)
    return f"{module}.{fused}.weight"


def _position(ed: ProgramEditor):
    order = {n: i for i, n in enumerate(ed.graph.nodes)}
    return order.__getitem__
