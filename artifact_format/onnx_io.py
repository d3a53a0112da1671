"""Graph <-> ONNX (graph.onnx of an artifact, docs/artifact.md): lossless both ways, deterministic bytes.

One ONNX node per graph node in domain ai.trilite, op_type = op, inputs and outputs = tensor names in role
order, role names in the string-list attributes input_roles / output_roles, every node attr an ONNX
attribute. Graph inputs are the tensors no node makes (step inputs, caches, weights — weight values stay in
weights.safetensors); every other tensor is a value_info or a graph output. A value's doc_string is its kind
("input", "cache", "weight", "activation", "output"). Symbolic dims are dim_params. Graph.meta is JSON in
metadata_props under "trilite.meta".

ONNX has no bool attributes and only float32 ones: a bool is stored as an int with doc_string "bool", a float
as the nearest float32 (what Netron shows) with the exact value's repr in the doc_string.
"""

from __future__ import annotations

import json

import onnx
from onnx import TensorProto, helper

from artifact_format.graph import Graph, Node, TensorSpec

DOMAIN = "ai.trilite"
DOMAIN_VERSION = 1
ONNX_OPSET = 21
IR_VERSION = 10
META_KEY = "trilite.meta"
ROLE_ATTRS = ("input_roles", "output_roles")
_ELEM = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
         "i32": TensorProto.INT32, "i64": TensorProto.INT64, "i8": TensorProto.INT8,
         "u8": TensorProto.UINT8}
_DTYPE = {v: k for k, v in _ELEM.items()}


def to_onnx(graph: Graph) -> onnx.ModelProto:
    """The ONNX model of ``graph`` (validated first); passes onnx.checker.check_model."""
    graph.validate()
    sources = graph.sources()
    inputs = [_value(t) for t in sources]
    outputs = [_value(graph.tensor(name)) for name in graph.outputs]
    infos = [_value(t) for t in graph.tensors if t not in sources and t.name not in graph.outputs]
    nodes = [_node(n) for n in graph.nodes]
    g = helper.make_graph(nodes, "trilite", inputs, outputs, value_info=infos)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              producer_name="trilite", ir_version=IR_VERSION)
    helper.set_model_props(model, {META_KEY: json.dumps(dict(graph.meta), sort_keys=True)})
    return model


def from_onnx(model: onnx.ModelProto) -> Graph:
    """The Graph that to_onnx wrote; ValueError for a model trilite did not write."""
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise ValueError(f"not a trilite graph: metadata_props has no {META_KEY}")
    g = model.graph
    values = {v.name: _spec(v) for v in (*g.input, *g.value_info, *g.output)}
    nodes = tuple(_graph_node(n) for n in g.node)
    order = [v.name for v in g.input] + [name for n in nodes for _, name in n.outputs]
    graph = Graph(nodes, tuple(values[name] for name in order), tuple(v.name for v in g.output),
                  tuple(sorted(json.loads(props[META_KEY]).items())))
    graph.validate()
    return graph


def _value(t: TensorSpec) -> onnx.ValueInfoProto:
    v = helper.make_tensor_value_info(t.name, _ELEM[t.dtype], list(t.shape))
    v.doc_string = t.kind
    return v


def _spec(v: onnx.ValueInfoProto) -> TensorSpec:
    tt = v.type.tensor_type
    shape = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim)
    return TensorSpec(v.name, _DTYPE[tt.elem_type], shape, v.doc_string)


def _node(n: Node) -> onnx.NodeProto:
    node = helper.make_node(n.op, [name for _, name in n.inputs], [name for _, name in n.outputs], name=n.name,
                            domain=DOMAIN, input_roles=[r for r, _ in n.inputs],
                            output_roles=[r for r, _ in n.outputs])
    for key, value in n.attrs:
        if key in ROLE_ATTRS:
            raise ValueError(f"node {n.name}: attr name {key} is reserved")
        if isinstance(value, bool):
            attr = helper.make_attribute(key, int(value))
            attr.doc_string = "bool"
        elif isinstance(value, int):
            attr = helper.make_attribute(key, value)
        elif isinstance(value, float):
            attr = helper.make_attribute(key, value)
            attr.doc_string = repr(value)
        elif isinstance(value, str):
            attr = helper.make_attribute(key, value)
        else:
            raise ValueError(f"node {n.name}: attr {key}={value!r} is not an int, float, str or bool")
        node.attribute.append(attr)
    return node


def _graph_node(n: onnx.NodeProto) -> Node:
    if n.domain != DOMAIN:
        raise ValueError(f"node {n.name}: domain {n.domain!r} is not {DOMAIN}")
    attrs = {a.name: a for a in n.attribute}
    in_roles = [r.decode() for r in attrs["input_roles"].strings]
    out_roles = [r.decode() for r in attrs["output_roles"].strings]
    values = []
    for a in n.attribute:
        if a.name in ROLE_ATTRS:
            continue
        if a.type == onnx.AttributeProto.INT:
            values.append((a.name, bool(a.i) if a.doc_string == "bool" else a.i))
        elif a.type == onnx.AttributeProto.FLOAT:
            values.append((a.name, float(a.doc_string) if a.doc_string else a.f))
        elif a.type == onnx.AttributeProto.STRING:
            values.append((a.name, a.s.decode()))
        else:
            raise ValueError(f"node {n.name}: attribute {a.name} has an unsupported type")
    return Node(n.op_type, tuple(zip(in_roles, n.input)), tuple(zip(out_roles, n.output)), tuple(values), n.name)
