import pytest
import torch

from artifact_format.graph import Limits
from compiler import ops
from compiler.memory import liveness, memory_plan, nbytes
from compiler.ops import Tracer
from compiler.passes import optimize
from tests.compiler.graph_eval import traced

PLAN_LIMITS = Limits(max_seq_len=32, max_batch=3, max_num_tokens=24, block_size=4)


def check_plan(graph, limits, plan):
    """No two buffers live at one node overlap; offsets aligned; aliases share; every arena tensor placed."""
    arena = [t for t in graph.tensors if t.kind in ("activation", "output")]
    assert set(plan["offsets"]) == {t.name for t in arena}
    assert all(off % 16 == 0 for off in plan["offsets"].values())
    live = liveness(graph)
    spans = {root: (plan["offsets"][root], plan["offsets"][root] + nbytes(graph.tensor(root), limits))
             for root in live}
    assert max(end for _, end in spans.values()) == plan["arena_bytes"]
    for a, (a0, a1) in spans.items():
        for b, (b0, b1) in spans.items():
            overlap_time = live[a][0] <= live[b][1] and live[b][0] <= live[a][1]
            if a < b and overlap_time:
                assert a1 <= b0 or b1 <= a0, f"{a} and {b} are live together and overlap"
    for t in arena:
        assert plan["offsets"][t.name] == plan["offsets"][graph.storage(t.name)]
    return spans


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_fused_model_plan(name):
    graph, weights, *_ = traced(name, "bf16")
    fused, _, _ = optimize(graph, weights, "bf16")
    plan = memory_plan(fused, PLAN_LIMITS)
    spans = check_plan(fused, PLAN_LIMITS, plan)
    # Qwen3's rope rotates qkv in place; Llama's rotates it in the qkv matmul's epilogue, which writes the caches
    # in place. Cache writes live in the runtime's cache, not the arena.
    if name == "qwen3":
        rope = next(n for n in fused.nodes if n.op == "rope")
        assert plan["offsets"][rope.output("qkv")] == plan["offsets"][rope.input("qkv")]
        qkv = rope.input("qkv")
    else:
        writer = next(n for n in fused.nodes if n.attr("act") == "rope")
        assert dict(writer.aliases) == {"k_cache": "k_cache", "v_cache": "v_cache"}
        qkv = writer.output("out")
    assert not any(t.kind == "cache" for t in fused.tensors if t.name in plan["offsets"])
    # Buffers are reused: the arena is far smaller than all buffers side by side.
    assert plan["arena_bytes"] < sum(b - a for a, b in spans.values()) / 2
    qkv_width = (4 + 2 * 2) * fused.get_meta("head_dim")
    assert nbytes(fused.tensor(qkv), PLAN_LIMITS) == 24 * qkv_width * 2
    assert nbytes(fused.tensor("logits"), PLAN_LIMITS) == -(-3 * 97 * 4 // 16) * 16  # R rows: up to max_batch


def test_unfused_trace_plan_is_valid_too():
    graph, *_ = traced("qwen2")
    check_plan(graph, PLAN_LIMITS, memory_plan(graph, PLAN_LIMITS))


def test_chain_reuses_the_buffer_freed_two_nodes_back():
    t = Tracer("fp32")
    x = ops.embedding(t.source("ids", "i32", ("T",), "input"), t.weight("e.weight", torch.randn(9, 6)))
    w = t.weight("w.weight", torch.randn(6))
    for _ in range(3):
        x = ops.rms_norm(x, w, 1e-6)
    out = ops.gather(x, t.source("last_idx", "i32", ("S",), "input"), name="out")
    graph = t.graph({"out": out}, {})
    limits = Limits(max_seq_len=8, max_batch=2, max_num_tokens=5)
    plan = memory_plan(graph, limits)
    # 5 rows x 6 fp32 = 120 bytes -> 128 aligned. A node never writes over a buffer it reads.
    assert [plan["offsets"][n.output("out")] for n in graph.nodes] == [0, 128, 0, 128, 0]
    assert plan["arena_bytes"] == 256
    check_plan(graph, limits, plan)


def test_unbounded_dims_are_refused():
    t = Tracer("fp32")
    cache = t.source("k_cache.0", "fp32", ("NB", 4), "input")
    out = ops.rms_norm(cache, t.weight("w.weight", torch.randn(4)), 1e-6, name="out")
    with pytest.raises(ValueError, match="'NB' has no bound"):
        memory_plan(t.graph({"out": out}, {}), PLAN_LIMITS)
