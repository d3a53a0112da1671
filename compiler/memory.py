"""Static memory plan: every activation and output tensor gets a fixed offset in one arena.

Liveness is over the node order: a buffer is live from the node that writes it to the last node that
reads it (or any in-place alias of it); graph outputs stay live to the end of the step. A node's
output never shares bytes with a buffer the node still reads. Offsets are assigned greedily, node by
node, first fit into the gaps that freed buffers left, and are 16-byte aligned so the kernels'
pointer divisibility hints hold. Each buffer is sized for the largest step the limits allow.
"""

from __future__ import annotations

import math

from artifact_format.graph import DTYPE_BYTES, Dim, Graph, Limits, TensorSpec
from artifact_format.layout import ALIGN


def max_rows(dim: Dim, limits: Limits) -> int:
    """The largest value a shape dim takes: T -> max_num_tokens, S and R -> max_batch, S+1 -> max_batch + 1.

    R (logits rows) is bounded by max_batch: full-prompt logits are produced in chunks of at most max_batch
    tokens, so the fp32 [R, V] buffer never grows to max_num_tokens rows.
    """
    if isinstance(dim, int):
        return dim
    sizes = {"T": limits.max_num_tokens, "R": limits.max_batch, "S": limits.max_batch,
             "S+1": limits.max_batch + 1}
    if dim not in sizes:
        raise ValueError(f"dim {dim!r} has no bound for an arena buffer (known: {', '.join(sizes)})")
    return sizes[dim]


def nbytes(spec: TensorSpec, limits: Limits) -> int:
    """Bytes of ``spec`` at its largest shape, rounded up to the alignment."""
    size = math.prod(max_rows(d, limits) for d in spec.shape) * DTYPE_BYTES[spec.dtype]
    return -(-size // ALIGN) * ALIGN


def liveness(graph: Graph) -> dict[str, tuple[int, int]]:
    """Arena buffer (named by its first tensor) -> (index of the node writing it, index of its last reader)."""
    arena = {t.name for t in graph.tensors if t.kind in ("activation", "output")}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for _, name in node.outputs:
            root = graph.storage(name)
            if root in arena:
                first.setdefault(root, i)
                last[root] = max(last.get(root, i), i)
        for _, name in node.inputs:
            root = graph.storage(name)
            if root in arena:
                last[root] = max(last[root], i)
    for name in graph.outputs:
        last[graph.storage(name)] = len(graph.nodes)
    return {root: (first[root], last[root]) for root in first}


def memory_plan(graph: Graph, limits: Limits) -> dict:
    """{"arena_bytes": int, "offsets": {tensor name: byte offset}} for every activation and output tensor.

    In-place aliases (artifact_format.graph.INPLACE) get their input's offset; tensors that live in the KV cache
    (kind "cache") have none.
    """
    live = liveness(graph)
    size = {root: nbytes(graph.tensor(root), limits) for root in live}
    placed: dict[str, int] = {}
    busy: list[tuple[int, int, str]] = []  # (offset, end, root) of live buffers
    arena = 0
    by_start: dict[int, list[str]] = {}
    for root, (start, _) in live.items():
        by_start.setdefault(start, []).append(root)
    for i in range(len(graph.nodes)):
        # A buffer read last by node i - 1 is free for node i's outputs; one read by node i is not.
        busy = [b for b in busy if live[b[2]][1] >= i]
        for root in by_start.get(i, []):
            offset = _first_fit(sorted(busy), size[root])
            placed[root] = offset
            busy.append((offset, offset + size[root], root))
            arena = max(arena, offset + size[root])
    offsets = {}
    for t in graph.tensors:
        if t.kind in ("activation", "output"):
            offsets[t.name] = placed[graph.storage(t.name)]
    return {"arena_bytes": arena, "offsets": offsets}


def _first_fit(busy: list[tuple[int, int, str]], size: int) -> int:
    """Lowest aligned offset where ``size`` bytes fit between the (sorted) busy ranges."""
    cursor = 0
    for offset, end, _ in busy:
        if offset - cursor >= size:
            return cursor
        cursor = max(cursor, end)
    return cursor
