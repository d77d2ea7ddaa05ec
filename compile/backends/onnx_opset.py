"""Rewrite an opset-18 graph from torch.onnx.export into opset 15 (what Ascend's ATC reads: 11..15).

torch 2.13's exporter emits opset 18 and its down-conversion (onnx.version_converter) stops at
ReduceMean's axes input ("No initializer or constant input to node found"), so the few operators
whose form changed between 15 and 18 are rewritten here, and anything else newer than the target
is refused by name:
- ReduceMean/ReduceSum*/ReduceMax/Min/Prod/L1/L2/LogSum*: axes input (18) -> `axes` attribute (ReduceSum
  kept its input since 13);
- Split with `num_outputs` (18) -> a `split` sizes input (13), from the input's static shape;
- LayerNormalization (17) -> ReduceMean / Sub / Mul / Add / Sqrt / Div (+ scale, bias), fp32 stash.
"""
from __future__ import annotations

import numpy as np

# Operators whose latest definition is newer than 15 but whose opset-15 form reads the same graph.
_SAME_SINCE = {"Pad", "Resize", "ScatterND", "ScatterElements", "Col2Im", "GridSample"}
_REDUCE_ATTR = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                "ReduceLogSumExp", "ReduceSumSquare"}


def downgrade(model, opset: int):
    import onnx
    from onnx import helper, numpy_helper, shape_inference
    if opset != 15:
        raise ValueError("only the rewrite to opset 15 is implemented")
    g = model.graph
    consts = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    counter = [0]

    def fresh(stem):
        counter[0] += 1
        return f"_op15_{stem}_{counter[0]}"

    def const_value(name):
        if name not in consts:
            raise ValueError(f"opset {opset} rewrite: {name} is not a constant")
        return numpy_helper.to_array(consts[name])

    new_nodes, extra_inits = [], []
    for n in g.node:
        if n.op_type in _REDUCE_ATTR and len(n.input) > 1 and n.input[1]:
            axes = [int(x) for x in const_value(n.input[1]).reshape(-1)]
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name != "noop_with_empty_axes"}
            new_nodes.append(helper.make_node(n.op_type, [n.input[0]], list(n.output), name=n.name, axes=axes, **attrs))
        elif n.op_type == "Split" and any(a.name == "num_outputs" for a in n.attribute):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            k, axis = attrs["num_outputs"], attrs.get("axis", 0)
            shape = shapes.get(n.input[0])
            if shape is None or shape[axis] is None:
                raise ValueError(f"opset {opset} rewrite: Split {n.name} needs a static size on axis {axis}")
            d = shape[axis]
            size = -(-d // k)
            sizes = [size] * (d // size) + ([d % size] if d % size else [])
            split = fresh("split")
            extra_inits.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), split))
            new_nodes.append(helper.make_node("Split", [n.input[0], split], list(n.output), name=n.name, axis=axis))
        elif n.op_type == "LayerNormalization":
            new_nodes.extend(_layer_norm(n, helper, numpy_helper, fresh, extra_inits))
        else:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(extra_inits)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", opset)])
    model.ir_version = 8            # ONNX 1.10's IR, the one that goes with opset 15
    schema_problems = []
    for n in g.node:
        try:
            s = onnx.defs.get_schema(n.op_type, opset, n.domain or "")
        except onnx.defs.SchemaError:
            schema_problems.append(n.op_type)
            continue
        if s.since_version > opset and n.op_type not in _SAME_SINCE:
            schema_problems.append(n.op_type)
    if schema_problems:
        raise ValueError(f"no opset-{opset} form for {sorted(set(schema_problems))}: compile with OPSET=18")
    return model


def _layer_norm(n, helper, numpy_helper, fresh, extra_inits):
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    axis, eps = attrs.get("axis", -1), attrs.get("epsilon", 1e-5)
    if axis != -1:
        raise ValueError(f"LayerNormalization over axis {axis}: only the last axis is rewritten")
    if len(n.output) > 1 and any(n.output[1:]):
        raise ValueError("LayerNormalization's mean/inv-std outputs are used: not rewritten")
    x, scale = n.input[0], n.input[1]
    bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
    mean, d, d2, var, ve, std, norm = (fresh(s) for s in ("mean", "d", "d2", "var", "ve", "std", "norm"))
    eps_name = fresh("eps")
    extra_inits.append(numpy_helper.from_array(np.array(eps, dtype=np.float32), eps_name))
    nodes = [helper.make_node("ReduceMean", [x], [mean], axes=[-1], keepdims=1),
             helper.make_node("Sub", [x, mean], [d]),
             helper.make_node("Mul", [d, d], [d2]),
             helper.make_node("ReduceMean", [d2], [var], axes=[-1], keepdims=1),
             helper.make_node("Add", [var, eps_name], [ve]),
             helper.make_node("Sqrt", [ve], [std]),
             helper.make_node("Div", [d, std], [norm])]
    if bias is None:
        nodes.append(helper.make_node("Mul", [norm, scale], [n.output[0]]))
    else:
        scaled = fresh("scaled")
        nodes += [helper.make_node("Mul", [norm, scale], [scaled]), helper.make_node("Add", [scaled, bias], [n.output[0]])]
    return nodes
