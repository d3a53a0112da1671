"""benchmarks/decode.py's MoE columns on a tiny Mixtral's graph (no GPU): the expert bytes a step reads and the
batch-1 expert-read bandwidth line, against counts made here from the weights' shapes."""

from __future__ import annotations

import math

import pytest

from runtime.artifact import load_artifact
from tests.e2e.conftest import TINY_LIMITS


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from compiler.build import build

    out = build("tiny-mixtral", tmp_path_factory.mktemp("decode-moe") / "a", targets=["cuda:90"], dtype="fp32",
                autotune=False, reference=False, **TINY_LIMITS).out
    return load_artifact(out, check_hashes=False).graph


def _expert_total(graph) -> tuple[int, int, int]:
    nodes = [n for n in graph.nodes if n.op == "moe"]
    total = sum(4 * math.prod(graph.tensor(n.input(r)).shape) for n in nodes for r in ("w13", "w2"))
    return total, graph.tensor(nodes[0].input("w13")).shape[0], nodes[0].attr("top_k")


def test_expert_bytes_batch_1_and_32(graph):
    from runtime.bench import expert_bytes

    total, E, top_k = _expert_total(graph)
    assert expert_bytes(graph, 1) == (total * top_k // E, total)
    # 32 tokens routed uniformly leave an expert unread with probability (1 - k / E)^32: about all are read
    read, _ = expert_bytes(graph, 32)
    assert read == pytest.approx(total * (1 - (1 - top_k / E) ** 32), abs=8)  # whole bytes per layer


def test_moe_reads_line(graph):
    from benchmarks.decode import moe_reads
    from runtime.bench import node_weight_bytes

    nodes = [n for n in graph.nodes if n.op == "moe"]
    role = nodes[0].name.rsplit(".", 1)[-1]
    # role_profile rows (role, launches, kernel µs, start-to-start µs, bytes): 10 µs for each moe kernel
    roles = [(f"{role} (moe_router_kernel)", 2, 5.0, 10.0, 0), (f"{role} (moe_gate_up_kernel)", 2, 5.0, 10.0, 0),
             (f"{role} (moe_down_kernel)", 2, 5.0, 10.0, 0), ("o_proj", 2, 5.0, 10.0, 0)]
    nbytes = sum(node_weight_bytes(graph, n) for n in nodes)
    (blank, line), = [moe_reads(graph, roles, bw=1e12)]
    assert blank == "" and f"{nbytes / 30 / 1e3:.0f} GB/s" in line and f"in {30.0:.1f} µs" in line
