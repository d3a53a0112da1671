import json

import onnx
import pytest

from artifact_format.onnx_io import DOMAIN, from_onnx, to_onnx
from compiler.passes import optimize
from tests.compiler.graph_eval import traced


def graphs(name, dtype="fp32"):
    graph, weights, *_ = traced(name, dtype)
    fused, _, _ = optimize(graph, weights, dtype)
    return graph, fused


@pytest.mark.parametrize("name,dtype", [("llama", "fp32"), ("qwen2", "bf16"), ("qwen3", "fp16"),
                                        ("mistral-swa", "fp32")])
def test_round_trip_is_lossless_and_checked(name, dtype):
    for graph in graphs(name, dtype):
        model = to_onnx(graph)
        onnx.checker.check_model(model, full_check=True)
        data = model.SerializeToString(deterministic=True)
        back = from_onnx(onnx.load_from_string(data))
        assert back == graph
        # Types survive too, not just equality (True == 1 in Python): bools stay bools, floats stay exact.
        for a, b in zip(back.nodes, graph.nodes):
            assert [(k, type(v)) for k, v in a.attrs] == [(k, type(v)) for k, v in b.attrs]
        assert to_onnx(back).SerializeToString(deterministic=True) == data


def test_bytes_are_deterministic():
    first = to_onnx(graphs("llama3-tied")[1]).SerializeToString(deterministic=True)
    second = to_onnx(graphs("llama3-tied")[1]).SerializeToString(deterministic=True)
    assert first == second


def test_layout_follows_the_artifact_format():
    _, fused = graphs("qwen3")
    model = to_onnx(fused)
    g = model.graph
    assert all(n.domain == DOMAIN and n.op_type == node.op and n.name == node.name
               for n, node in zip(g.node, fused.nodes))
    rope = next(n for n in g.node if n.op_type == "rope")
    attrs = {a.name: a for a in rope.attribute}
    assert [s.decode() for s in attrs["input_roles"].strings] == ["qkv", "positions", "cos_sin", "q_norm", "k_norm",
                                                                 "slot_mapping", "k_cache", "v_cache"]
    assert [s.decode() for s in attrs["output_roles"].strings] == ["qkv", "k_cache", "v_cache"]
    assert attrs["use_qk_norm"].i == 1 and attrs["write_cache"].i == 1 and abs(attrs["eps"].f - 1e-5) < 1e-10
    # Weights are graph inputs marked in their doc string; their values never enter the ONNX file.
    kinds = {v.name: v.doc_string for v in g.input}
    assert {n for n, k in kinds.items() if k == "weight"} == {t.name for t in fused.by_kind("weight")}
    assert kinds["ids"] == "input" and kinds["k_cache.0"] == "cache"
    assert len(g.initializer) == 0
    dims = {d.dim_param for v in (*g.input, *g.output, *g.value_info) for d in v.type.tensor_type.shape.dim}
    assert {"T", "S", "S+1", "R", "NB"} <= dims
    assert [o.name for o in g.output] == ["logits"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["trilite.meta"]) == dict(fused.meta)
    assert {o.domain: o.version for o in model.opset_import}[DOMAIN] == 1


def test_foreign_models_are_refused():
    model = to_onnx(graphs("llama")[1])
    del model.metadata_props[:]
    with pytest.raises(ValueError, match="not a trilite graph"):
        from_onnx(model)


def test_rope_epilogue_node_layout():
    # The qkv matmul that took in rope and the cache write: its extra roles and attrs, as Netron shows them.
    _, fused = graphs("phi3")
    node = next(n for n in to_onnx(fused).graph.node if n.op_type == "rms_norm_linear")
    attrs = {a.name: a for a in node.attribute}
    assert [s.decode() for s in attrs["input_roles"].strings] == ["x", "w", "positions", "cos_sin", "slot_mapping",
                                                                 "k_cache", "v_cache"]
    assert [s.decode() for s in attrs["output_roles"].strings] == ["out", "k_cache", "v_cache"]
    assert attrs["act"].s == b"rope" and attrs["is_neox"].doc_string == "bool" and attrs["write_cache"].i == 1
    assert (attrs["head_dim"].i, attrs["rotary_dim"].i) == (12, 6)  # Phi-3's partial rotary
