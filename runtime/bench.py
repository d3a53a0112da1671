"""A llama-bench-like measurement of an engine: prompt processing (pp) and token generation (tg) speed.

pp: one sequence of ``pp`` random tokens prefilled (in chunks of the engine's step budget, max_num_batched_tokens),
tokens per second.
tg: ``batch`` sequences generating ``tg`` tokens each from an empty context, one decode step per token (CUDA
graphs where the backend has them), each step's greedy-sampled ids fed in as the next step's on the device
while the host enqueues one step ahead, as the engine's asynchronous decode does. Per decode step the model
reads every weight once plus the KV cache of each sequence; that byte count over the step time is the achieved
bandwidth, reported against the device-to-device copy bandwidth measured in the same process (bytes read +
written). Times come from CUDA events after a warm-up run.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from artifact_format.graph import DTYPE_BYTES
from runtime.step import Chunk, make_step


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), None where that is unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def copy_bandwidth(device: Any, nbytes: int | None = None, repeats: int = 7) -> float:
    """Bytes per second of a large copy on a torch ``device`` (read + written), median of ``repeats``: for the
    benchmarks that run torch themselves (benchmarks/gemv.py, decode.py); backends measure their own
    (``Backend.copy_bandwidth``), and this module imports no torch for them."""
    import time

    import torch

    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (1 << 28))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def _weights(graph: Any, nodes: Any) -> set[str]:
    """The weight tensors ``nodes`` read; the embedding reads a few rows of its table, so it is left out."""
    return {name for node in nodes if node.op != "embedding" for _, name in node.inputs
            if graph.tensor(name).kind == "weight"}


def _nbytes(graph: Any, names: set[str]) -> int:
    return sum(math.prod(graph.tensor(n).shape) * DTYPE_BYTES[graph.tensor(n).dtype] for n in names)


# The roles of an moe node whose weights hold one slice per expert, of which a token reads top_k (kernels/moe.py):
# the expert weights and, in a quantized build, their scales.
EXPERT_ROLES = ("w13", "w2", "w13_scale", "w2_scale")


def _expert_bytes_unread(graph: Any, nodes: Any, batch: int = 1) -> int:
    """Bytes of the experts a decode step of ``batch`` sequences skips: one token reads top_k of each moe node's E
    experts; ``batch`` tokens routed independently and uniformly leave each expert unread with probability
    (1 - top_k / E) ** batch (the expected bytes; real routers are less uniform)."""
    out = 0
    for node in nodes:
        if node.op == "moe":
            nbytes = _nbytes(graph, {node.input(role) for role in EXPERT_ROLES if node.input(role)})
            experts, top_k = graph.tensor(node.input("w13")).shape[0], node.attr("top_k")
            out += nbytes * (experts - top_k) // experts if batch == 1 else int(nbytes * (1 - top_k / experts) ** batch)
    return out


def expert_bytes(graph: Any, batch: int = 1) -> tuple[int, int]:
    """(expert bytes a decode step of ``batch`` sequences reads, every expert byte of the model): what the moe nodes'
    expert weights (and scales) contribute to decode_weight_bytes, as _expert_bytes_unread counts them."""
    moe = [n for n in graph.nodes if n.op == "moe"]
    total = sum(_nbytes(graph, {n.input(role) for role in EXPERT_ROLES if n.input(role)}) for n in moe)
    return total - _expert_bytes_unread(graph, moe, batch), total


def node_weight_bytes(graph: Any, node: Any) -> int:
    """Weight bytes one decode step of one sequence reads through ``node`` (a tied lm_head counts under logits; an
    moe node counts its router and the top_k experts one token reads; the embedding's few rows are left out)."""
    return _nbytes(graph, _weights(graph, [node])) - _expert_bytes_unread(graph, [node])


def weight_bytes_by_op(graph: Any) -> dict[str, int]:
    """op -> weight bytes one decode step of one sequence reads through that op's nodes (node_weight_bytes)."""
    out: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "embedding":
            out[node.op] = out.get(node.op, 0) + node_weight_bytes(graph, node)
    return out


def decode_weight_bytes(graph: Any, batch: int = 1) -> int:
    """Weight bytes one decode step of ``batch`` sequences reads: every weight but the embedding table, each once (a
    tied lm_head still counts, through the logits node), of an MoE layer's experts those its tokens pick (batch 1:
    top_k of E; more: the expected share, see _expert_bytes_unread)."""
    return _nbytes(graph, _weights(graph, graph.nodes)) - _expert_bytes_unread(graph, graph.nodes, batch)


def kv_bytes_per_token(graph: Any, block_size: int) -> int:
    """KV-cache bytes one token takes over every layer, K and V (source caches only: written names alias them)."""
    return sum(math.prod(d for d in t.shape if d != "NB") * DTYPE_BYTES[t.dtype]
               for t in graph.sources("cache")) // block_size


def greedy_inputs(rows: int) -> dict[str, np.ndarray]:
    """The sampling op's inputs [rows] for greedy rows (temperature 0, filters off), as host arrays."""
    zeros, z64 = np.zeros(rows, np.float32), np.zeros(rows, np.int64)
    return {"temperature": zeros, "top_k": np.zeros(rows, np.int32), "top_p": np.ones(rows, np.float32),
            "min_p": zeros, "seeds": z64, "offsets": z64}


class _Runner:
    """Steps straight on the engine's backend, with KV blocks taken from (and returned to) its allocator."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.backend = engine.backend
        self.limits = engine.limits
        self.bs = self.limits.block_size
        self.width = -(-self.limits.max_seq_len // self.bs)
        self.gen = np.random.default_rng(0)
        vocab = int(engine.artifact.graph.get_meta("vocab_size"))
        self.ids = lambda n: self.gen.integers(0, vocab, n).tolist()
        self._greedy: dict[int, tuple] = {}

    def blocks(self, seqs: int, tokens: int) -> list[list[int]] | None:
        need = -(-tokens // self.bs)
        if seqs * need > self.engine.allocator.num_free:
            return None
        return [self.engine.allocator.allocate(need) for _ in range(seqs)]

    def release(self, tables: list[list[int]]) -> None:
        for t in tables:
            self.engine.allocator.free(t)

    def greedy(self, logits: np.ndarray) -> list[int]:
        # host parameters: the backend stages them into one upload, as the engine's are
        rows = logits.shape[0]
        if rows not in self._greedy:
            self._greedy[rows] = greedy_inputs(rows)
        return np.asarray(self.backend.sample(logits, **self._greedy[rows])).tolist()

    def prefill(self, ids: list[int], table: list[int]) -> np.ndarray:
        chunk = self.engine.scheduler.max_num_tokens
        for start in range(0, len(ids), chunk):
            step = make_step("prefill", [Chunk(ids[start:start + chunk], start, table)], self.bs, self.width)
            logits = self.backend.forward(step)
        return logits

    def generate(self, tables: list[list[int]], steps: int) -> None:
        """Greedy decode steps as the engine's asynchronous path runs them: each step's ids are fed to the next on
        the device (-1 on the host), so the host never waits for the GPU between steps."""
        rows = len(tables)
        greedy = greedy_inputs(rows)
        tokens, feed, pending = self.ids(rows), None, None
        for pos in range(steps):
            chunks = [Chunk([t], pos, table) for t, table in zip(tokens, tables)]
            pending = self.backend.submit(make_step("decode", chunks, self.bs, self.width), greedy, feed)
            tokens, feed = [-1] * rows, np.arange(rows, dtype=np.int32)
        if pending is not None:
            pending.tokens()


def _row(test: str, batch: int, **values: float | None) -> dict:
    keys = ("tokens_per_s", "ms_per_token", "gb_per_s", "pct_copy_bw", "copy_gb_per_s", "graph_capture_s",
            "first_token_s")
    return {"test": test, "batch": batch, **{k: values.get(k) for k in keys}}


def run_bench(engine: Any, pp: int = 512, tg: int = 128, batch_sizes: Sequence[int] = (1, 16)) -> list[dict]:
    """Measure ``engine`` (runtime.engine.Engine); one dict per test row, all with the same keys.

    tokens_per_s counts every sequence's tokens; ms_per_token is the time of one step (one token per sequence).
    Rows: pp{pp} (batch 1) with the seconds from process start to the first sampled token (a 16-token prompt,
    measured before anything else here, so meaningful when the bench is the process's first work), then
    tg{tg} per batch size (above max_batch or beyond the free KV blocks: skipped) with the graph capture time.
    """
    run = _Runner(engine)
    timed = run.backend.timed
    lim = run.limits
    table = run.blocks(1, 16)
    run.greedy(run.prefill(run.ids(16), table[0]))
    first = process_age()
    run.release(table)
    capture = run.backend.capture_graphs()
    copy = run.backend.copy_bandwidth()
    graph = engine.artifact.graph
    rows = []

    pp = min(pp, lim.max_seq_len)
    table = run.blocks(1, pp)
    if table is not None:
        ids = run.ids(pp)
        run.prefill(ids, table[0])  # warm-up
        t = statistics.median(timed(lambda: run.prefill(ids, table[0])) for _ in range(3))
        run.release(table)
        rows.append(_row(f"pp{pp}", 1, tokens_per_s=pp / t, ms_per_token=1e3 * t / pp, first_token_s=first,
                         copy_gb_per_s=copy / 1e9))

    kv_token = kv_bytes_per_token(graph, lim.block_size)
    steps = min(tg, lim.max_seq_len)
    for batch in batch_sizes:
        weights = decode_weight_bytes(graph, batch)
        tables = run.blocks(batch, steps) if batch <= lim.max_batch else None
        if tables is None:
            continue
        run.generate(tables, min(steps, 8))  # warm-up
        t = timed(lambda: run.generate(tables, steps))  # noqa: B023 (called right here)
        run.release(tables)
        # step p reads every weight once and p + 1 cached tokens of each sequence
        moved = weights * steps + kv_token * batch * steps * (steps + 1) // 2
        rows.append(_row(f"tg{steps}", batch, tokens_per_s=batch * steps / t, ms_per_token=1e3 * t / steps,
                         gb_per_s=moved / t / 1e9, pct_copy_bw=100 * moved / t / copy, copy_gb_per_s=copy / 1e9,
                         graph_capture_s=capture))
    return rows
