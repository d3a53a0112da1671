"""What one forward step of the graph consumes: the step inputs of docs/ops.md as int32 numpy arrays on the host.

A step is either a prefill (each sequence brings a run of tokens that continues its cached prefix: chunked
prefill, and the mixed steps where running sequences bring their one decode token beside prompt chunks) or a
decode (every sequence brings exactly one token).
Backends copy these tensors into their own buffers; nothing here depends on a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KINDS = ("prefill", "decode")


@dataclass(frozen=True)
class StepInput:
    kind: str  # "prefill" | "decode"
    ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    slot_mapping: np.ndarray  # [T] int32, block * block_size + offset
    cu_seqlens_q: np.ndarray  # [S+1] int32
    seq_lens: np.ndarray  # [S] int32, kv length including this step's tokens
    block_tables: np.ndarray  # [S, max_blocks] int32, unused entries 0
    last_idx: np.ndarray  # [R] int32, rows whose logits are wanted

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"step kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "decode" and self.T != self.S:
            raise ValueError(f"a decode step carries one token per sequence, got T={self.T} for S={self.S}")

    @property
    def T(self) -> int:
        return self.ids.shape[0]

    @property
    def S(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def R(self) -> int:
        return self.last_idx.shape[0]

    def single_token_rows(self, n: int) -> bool:
        """Whether the first ``n`` rows carry one token each (so row i is token i): what a feed may cover."""
        return n <= self.S and bool((self.cu_seqlens_q[:n + 1] == np.arange(n + 1)).all())

    def inputs(self) -> dict[str, np.ndarray]:
        """The step inputs by their graph names (artifact_format.graph.STEP_INPUTS)."""
        return {"ids": self.ids, "positions": self.positions, "slot_mapping": self.slot_mapping,
                "cu_seqlens_q": self.cu_seqlens_q, "seq_lens": self.seq_lens, "block_tables": self.block_tables,
                "last_idx": self.last_idx}


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step: ``token_ids`` at positions ``start ...``, cached in ``block_table``."""

    token_ids: Sequence[int]
    start: int  # tokens of this sequence already in the cache
    block_table: Sequence[int]


def make_step(kind: str, chunks: Sequence[Chunk], block_size: int, max_blocks: int,
              all_logits: bool = False) -> StepInput:
    """Build the step arrays for ``chunks`` (one per sequence, in row order).

    ``all_logits``: ask for the logits of every token (R = T) instead of each sequence's last (R = S).
    """
    if not chunks:
        raise ValueError("a step needs at least one sequence")
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu = [0]
    seq_lens = []
    tables = np.zeros((len(chunks), max_blocks), dtype=np.int32)
    for row, c in enumerate(chunks):
        n = len(c.token_ids)
        end = c.start + n
        if n == 0 or len(c.block_table) * block_size < end or len(c.block_table) > max_blocks:
            raise ValueError(f"sequence {row}: {n} tokens at {c.start} do not fit its {len(c.block_table)} blocks")
        ids.extend(c.token_ids)
        positions.extend(range(c.start, end))
        slots.extend(c.block_table[p // block_size] * block_size + p % block_size for p in range(c.start, end))
        cu.append(cu[-1] + n)
        seq_lens.append(end)
        if c.block_table:
            tables[row, : len(c.block_table)] = c.block_table
    i32 = lambda xs: np.array(xs, dtype=np.int32)
    last = list(range(cu[-1])) if all_logits else [e - 1 for e in cu[1:]]
    return StepInput(kind, i32(ids), i32(positions), i32(slots), i32(cu), i32(seq_lens), tables, i32(last))
