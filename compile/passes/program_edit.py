"""Rewriting an ExportedProgram's graph together with its inputs (parameters, buffers).

A pass that only rewires nodes could edit `ep.graph` in place; ours also add parameters
(fused weights), non-persistent buffers (RoPE tables) and drop the inputs they replace,
which means keeping the placeholders, the graph signature's input specs, the state dict
and the constants table in step. `ProgramEditor` does that bookkeeping on a copy of the
graph (the input program is never modified, so a caller can compare before and after)
and builds a fresh, verified ExportedProgram at the end.

New nodes get a `meta["val"]` computed with the program's own fake mode, as export
would have recorded it, so later passes and the verifier see consistent shapes.
"""
from __future__ import annotations

import copy
import operator
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.fx
from torch.export import ExportedProgram
from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputSpec,
                                          TensorArgument)
from torch.fx import Node

aten = torch.ops.aten
ASSERT_META = aten._assert_tensor_metadata.default
TO_DTYPE = (aten.to.dtype, aten._to_copy.default)


def is_op(node: Any, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def cast_dtype(node: Node) -> torch.dtype | None:
    """The dtype an `aten.to.dtype` / `aten._to_copy` node casts to, else None."""
    if not is_op(node, *TO_DTYPE):
        return None
    if node.target is aten.to.dtype:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    return node.kwargs.get("dtype")


def val(node: Any):
    return node.meta.get("val") if isinstance(node, Node) else node


def rows(v) -> int:
    """The rows of tensor value v (the product of all but its last dimension) as the passes choose lowerings
    by: a dynamic dimension (the chunk length of a prefill graph, compile/export.py `dynamic_tokens`) counts
    at its example value, the bucket's largest, so a pass decides without adding guards on it."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint   # no guard added
    n = 1
    for d in v.shape[:-1]:
        n *= optimization_hint(d)
    return n


def input_fqn(specs: dict[str, InputSpec], node: Any, *kinds: InputKind) -> str | None:
    """`specs`: placeholder name -> InputSpec. The FQN of a non-user-input placeholder of `kinds`."""
    if not isinstance(node, Node) or node.op != "placeholder" or node.name not in specs:
        return None
    spec = specs[node.name]
    if spec.kind == InputKind.USER_INPUT or (kinds and spec.kind not in kinds):
        return None
    return spec.target


def input_specs_by_name(ep: ExportedProgram) -> dict[str, InputSpec]:
    return {s.arg.name: s for s in ep.graph_signature.input_specs}


def linear_bias(node: Node) -> Any:
    """The bias argument of an `aten.linear` node (None if it has none)."""
    return node.args[2] if len(node.args) > 2 else None


def real_users(node: Node) -> list[Node]:
    """Users other than export's `_assert_tensor_metadata` checks."""
    return [u for u in node.users if not is_op(u, ASSERT_META)]


class ProgramEditor:
    """A mutable copy of `ep` for one pass; `finish()` returns the rewritten program."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.graph: torch.fx.Graph = copy.deepcopy(ep.graph)   # node meta is copied shallowly
        self.specs: dict[str, InputSpec] = input_specs_by_name(ep)
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)
        self._removable: set[str] = set()
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.fake_mode = torch._guards.detect_fake_mode([val(n) for n in placeholders])

    # ------------------------------------------------------------------ inputs
    def input_spec(self, node: Any) -> InputSpec | None:
        if not isinstance(node, Node) or node.op != "placeholder":
            return None
        return self.specs.get(node.name)

    def fqn(self, node: Any, *kinds: InputKind) -> str | None:
        """The state-dict / constants name behind a parameter, buffer or constant placeholder."""
        return input_fqn(self.specs, node, *kinds)

    def tensor(self, node: Any) -> torch.Tensor | None:
        name = self.fqn(node)
        if name is None:
            return None
        return self.state_dict[name] if name in self.state_dict else self.constants.get(name)

    def user_input(self, *names: str) -> Node | None:
        for node in self.graph.nodes:
            spec = self.input_spec(node)
            if spec is not None and spec.kind == InputKind.USER_INPUT and node.name in names:
                return node
        return None

    def add_parameter(self, fqn: str, tensor: torch.Tensor, before: Node) -> Node:
        if not isinstance(tensor, torch.nn.Parameter):
            tensor = torch.nn.Parameter(tensor, requires_grad=False)
        self.state_dict[fqn] = tensor
        return self._add_input("p_", fqn, tensor, before, InputKind.PARAMETER, None)

    def add_buffer(self, fqn: str, tensor: torch.Tensor, before: Node) -> Node:
        """A non-persistent buffer: lives in `constants`, compiled as a graph constant."""
        self.constants[fqn] = tensor
        return self._add_input("b_", fqn, tensor, before, InputKind.BUFFER, False)

    def _add_input(self, prefix, fqn, tensor, before, kind, persistent) -> Node:
        if any(s.target == fqn for s in self.specs.values()):
            raise ValueError(f"the program already has an input named {fqn}")
        name = prefix + fqn.replace(".", "_")
        if any(n.name == name for n in self.graph.nodes):
            raise ValueError(f"graph already has a node named {name}")
        with self.graph.inserting_before(before):
            node = self.graph.create_node("placeholder", name, name=name)
        node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        self.specs[name] = InputSpec(kind=kind, arg=TensorArgument(name=name), target=fqn, persistent=persistent)
        return node

    def drop_input_if_unused(self, node: Node) -> None:
        """Remove a parameter/buffer/constant input at finish() if nothing uses it by then."""
        if self.fqn(node) is not None:
            self._removable.add(node.name)

    # ------------------------------------------------------------------ nodes
    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, like: Node | None = None) -> Node:
        """A call_function node at the current insertion point, with its fake value."""
        node = self.graph.call_function(target, tuple(args), kwargs or {})
        if like is not None:
            for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn"):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        a, kw = torch.fx.node.map_arg((node.args, node.kwargs), val)
        with self.fake_mode:
            node.meta["val"] = target(*a, **kw)
        return node

    def replace(self, node: Node, build: Callable[[], Node]) -> Node:
        """Replace `node` by what `build()` returns, its nodes inserted right before `node`: the users move to
        the new node and `node` is erased."""
        with self.graph.inserting_before(node):
            new = build()
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return new

    # ------------------------------------------------------------------ result
    def finish(self) -> ExportedProgram:
        remove_dead_code(self.graph)
        for node in list(self.graph.nodes):
            if node.op == "placeholder" and node.name in self._removable and not node.users:
                spec = self.specs.pop(node.name)
                self.state_dict.pop(spec.target, None)
                self.constants.pop(spec.target, None)
                self.graph.erase_node(node)
        self.graph.lint()
        gm = torch.fx.GraphModule(self.ep.graph_module, self.graph)
        gm.meta.update(self.ep.graph_module.meta)
        input_specs = [self.specs[n.name] for n in self.graph.nodes if n.op == "placeholder"]
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        outputs = out_node.args[0]
        output_specs = []
        for spec, value in zip(self.ep.graph_signature.output_specs, outputs):
            if isinstance(spec.arg, TensorArgument) and isinstance(value, Node):
                spec = OutputSpec(kind=spec.kind, arg=TensorArgument(name=value.name), target=spec.target)
            output_specs.append(spec)
        signature = ExportGraphSignature(input_specs=input_specs, output_specs=output_specs)
        with warnings.catch_warnings():   # torch 2.13 deep-copying a TreeSpec warns about LeafSpec
            warnings.simplefilter("ignore", FutureWarning)
            call_graph = copy.deepcopy(self.ep.module_call_graph)
        return ExportedProgram(
            root=gm, graph=gm.graph, graph_signature=signature, state_dict=self.state_dict,
            range_constraints=copy.deepcopy(self.ep.range_constraints),
            module_call_graph=call_graph,
            example_inputs=self.ep.example_inputs, constants=self.constants, verifiers=self.ep.verifiers)


def _is_pure(node: Node) -> bool:
    if node.target is operator.getitem:
        return True
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    if target.namespace in ("_c10d_functional", "c10d_functional"):
        return False
    return target not in torch.fx.node._side_effectful_functions


def remove_dead_code(graph: torch.fx.Graph) -> int:
    """Erase pure nodes nobody uses, and export's metadata asserts on values nobody else uses.

    (`Graph.eliminate_dead_code` keeps `_assert_tensor_metadata`, which would keep every
    replaced subgraph alive.) In-place ops (the KV-cache writes) and collectives are kept.
    """
    removed = 0
    while True:
        before = removed
        for node in reversed(list(graph.nodes)):
            if node.op != "call_function":
                continue
            if node.target is ASSERT_META:
                t = node.args[0]
                if isinstance(t, Node) and all(is_op(u, ASSERT_META) for u in t.users):
                    graph.erase_node(node)
                    removed += 1
            elif not node.users and _is_pure(node):
                graph.erase_node(node)
                removed += 1
        if removed == before:
            return removed


class TensorCache:
    """Derived tensors shared by every program built from the same source tensors.

    All graphs of a rank are exported from one model, so they hold the same parameter
    objects; a fused weight derived from them is computed once and the same tensor goes
    into every program (one copy in memory during compile, one key in the artifact). An
    entry lives as long as its first source tensor and is rebuilt if a source changed.
    """

    def __init__(self):
        self._entries: dict[tuple, tuple[list, list[int], torch.Tensor]] = {}

    def get(self, name: str, sources: list[torch.Tensor], build: Callable[[], torch.Tensor],
            extra_key: tuple = ()) -> torch.Tensor:
        key = (name, tuple(id(t) for t in sources), extra_key)
        hit = self._entries.get(key)
        versions = [t._version for t in sources]
        if hit is not None:
            refs, seen, value = hit
            if all(r() is t for r, t in zip(refs, sources)) and seen == versions:
                return value
        value = build()
        self._entries[key] = ([weakref.ref(t) for t in sources], versions, value)
        weakref.finalize(sources[0], self._entries.pop, key, None)
        return value
