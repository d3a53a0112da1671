"""Bound launches: index.json's kernel launches with every parameter resolved to a buffer, a symbol or a constant.

``runtime.program.Program`` makes them; the backends run them (driver calls, or the Triton interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from artifact_format.kernel_index import Binary, eval_grid
from runtime.errors import ArtifactError


@dataclass(frozen=True)
class BoundParam:
    """One kernel parameter: kind "tensor" (value: a Memory's array, with ``data_ptr()``), "sym" (value: symbol
    name), "int" or "float"."""

    name: str
    type: str  # "*fp16", "i32", "i64", "fp32", ...
    kind: str
    value: Any


@dataclass(frozen=True, eq=False)
class BoundLaunch:
    """One kernel launch with every parameter resolved; ``uid`` indexes ``Program.all_launches()``."""

    uid: int
    node: str
    key: str  # binary key in KernelIndex.binaries
    binary: Binary
    params: tuple[BoundParam, ...]
    grid: tuple  # dims, each a list of [sym | None, div, mul] terms
    global_scratch: Any = None  # a Memory's array, or None
    profile_scratch: Any = None

    def grid_for(self, env: dict[str, int]) -> tuple[int, int, int]:
        """The launch grid for a step's symbols, padded to three dimensions."""
        dims = eval_grid(self.grid, env)
        return dims + (1,) * (3 - len(dims))

    def args(self, env: dict[str, int]) -> list:
        """Parameter values in order: buffers for pointers, numbers for scalars (symbols from ``env``)."""
        return [int(env[p.value]) if p.kind == "sym" else p.value for p in self.params]


@dataclass(frozen=True)
class BoundVariant:
    step: str  # "any" | "prefill" | "decode"
    max_T: int | None
    launches: tuple[BoundLaunch, ...]

    def matches(self, kind: str, T: int) -> bool:
        return self.step in ("any", kind) and (self.max_T is None or T <= self.max_T)


@dataclass(frozen=True)
class BoundNode:
    name: str
    op: str
    variants: tuple[BoundVariant, ...]

    def select(self, kind: str, T: int) -> BoundVariant:
        for v in self.variants:
            if v.matches(kind, T):
                return v
        raise ArtifactError(f"node {self.name} has no kernel variant for a {kind} step of {T} tokens: "
                            f"rebuild the artifact")
