"""What every pass shares: matching producers and sole consumers, replacing nodes, rebuilding a valid Graph.

A pass reads a Graph and collects replacements in an ``Edit``; ``Edit.graph()`` builds the new Graph:
nodes in a stable topological order (a fused node may take over an output that was read before its
new position), tensor table in canonical order, unused tensor specs dropped, validated.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from artifact_format.graph import Graph, Node, TensorSpec


def make_node(op: str, name: str, inputs: dict[str, str | None], outputs: dict[str, str], **attrs: Any) -> Node:
    """A Node with roles in the given order (None inputs left out) and sorted attrs."""
    return Node(op, tuple((r, n) for r, n in inputs.items() if n is not None), tuple(outputs.items()),
                tuple(sorted(attrs.items())), name)


def renamed(name: str, old_op: str, new_op: str) -> str:
    """A fused node's name: "layers.0.mul" -> "layers.0.silu_mul"; names not ending in the old op stay."""
    if name == old_op or name.endswith("." + old_op):
        return name[: len(name) - len(old_op)] + new_op
    return name


def merged_name(names: list[str]) -> str:
    """One name for tensors concatenated together: "...q_proj.weight" x3 -> "...qkv_proj.weight".

    The dotted components all names share at the front and back stay; the differing middles lose their
    common ending ("_proj"), are joined (plain for one letter each, else by "_"), and get it back.
    """
    parts = [n.split(".") for n in names]
    head = len(os.path.commonprefix(parts))
    tail = len(os.path.commonprefix([p[head:][::-1] for p in parts]))
    middles = [".".join(p[head: len(p) - tail]) for p in parts]
    ending = os.path.commonprefix([m[::-1] for m in middles])[::-1]
    stems = [m[: len(m) - len(ending)] for m in middles]
    joined = ("" if all(len(s) == 1 for s in stems) else "_").join(stems) + ending
    return ".".join(parts[0][:head] + [joined] + parts[0][len(parts[0]) - tail:])


class Edit:
    """Replacements collected over one walk of a graph; each node joins at most one rewrite."""

    def __init__(self, graph: Graph):
        self.g = graph
        self.producers = graph.producers()
        self.consumers = graph.consumers()
        self.taken: set[str] = set()  # names of nodes already part of a rewrite
        self.replaced: dict[str, list[Node]] = {}
        self.new_specs: dict[str, TensorSpec] = {}

    def spec(self, name: str) -> TensorSpec:
        return self.new_specs.get(name) or self.g.tensor(name)

    def producer(self, tensor: str | None, op: str, user: Node | None = None) -> Node | None:
        """The node of op ``op`` making ``tensor``, if it is free, and (given ``user``) read by ``user`` only."""
        node = self.producers.get(tensor) if tensor is not None else None
        if node is None or node.op != op or node.name in self.taken:
            return None
        if user is not None and not self.sole_user(tensor, user):
            return None
        return node

    def sole_user(self, tensor: str, user: Node) -> bool:
        return tensor not in self.g.outputs and [n.name for n in self.consumers.get(tensor, [])] == [user.name]

    def replace(self, old: Iterable[Node], new: Node | list[Node], at: Node) -> None:
        """Drop the ``old`` nodes; ``new`` goes where ``at`` (one of them) was."""
        old = list(old)
        if any(n.name in self.taken for n in old):
            raise AssertionError(f"{[n.name for n in old]}: a node joins two rewrites")
        self.taken.update(n.name for n in old)
        for n in old:
            self.replaced[n.name] = []
        self.replaced[at.name] = new if isinstance(new, list) else [new]

    def add_spec(self, spec: TensorSpec) -> TensorSpec:
        self.new_specs[spec.name] = spec
        return spec

    def fresh(self, name: str) -> str:
        """``name``, or name.1, name.2, ... if a tensor has it already."""
        taken = {t.name for t in self.g.tensors} | set(self.new_specs)
        out, i = name, 0
        while out in taken:
            i += 1
            out = f"{name}.{i}"
        return out

    def graph(self) -> Graph:
        nodes = [m for n in self.g.nodes for m in self.replaced.get(n.name, [n])]
        return rebuild(self.g, nodes, self.new_specs.values())


def rebuild(graph: Graph, nodes: list[Node], new_specs: Iterable[TensorSpec] = ()) -> Graph:
    """A valid Graph of ``nodes``: stable topological order, canonical tensor table, unused specs dropped.

    Inputs and source caches stay even when unused: the runtime fills them every step regardless.
    """
    specs = {t.name: t for t in graph.tensors}
    specs.update({t.name: t for t in new_specs})
    nodes = _toposort(nodes)
    produced = {n for node in nodes for _, n in node.outputs}
    used = {n for node in nodes for _, n in (*node.inputs, *node.outputs)} | set(graph.outputs)
    keep = tuple(t for t in specs.values()
                 if t.name in used or (t.kind in ("input", "cache") and t.name not in produced))
    out = replace(graph, nodes=tuple(nodes), tensors=keep).canonical()
    out.validate()
    return out


def _toposort(nodes: list[Node]) -> list[Node]:
    """Nodes ordered so each comes after its inputs' producers, otherwise keeping the given order."""
    producer = {name: i for i, node in enumerate(nodes) for _, name in node.outputs}
    deps = [{producer[n] for _, n in node.inputs if n in producer} for node in nodes]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in users.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the rewritten graph has a cycle")
    return order
