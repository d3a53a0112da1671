"""kernels/TARGET/index.json (docs/artifact.md): which binary each graph node launches, with what, over what grid.

The compiler builds a ``KernelIndex`` and writes ``to_json()``; the runtime reads it back with ``from_json``, which
checks every field it will rely on and raises ``IndexFormatError`` (one sentence) for anything malformed.

Grids are tuples of dims; a dim is a sum of terms [sym | None, div, mul] = ceil(sym / div) * mul (a constant
``mul`` when sym is None), over the step's symbols T, S and R. A parameter is bound to
  ("tensor", role)  the node's tensor with that role (input, output or scratch)
  ("sym", name)     the step's value of a symbol (i32)
  ("int", value)    a static integer (i32 or i64, per its type)
  ("float", value)  a static float (fp32)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GridTerm = tuple  # (sym: str | None, div: int, mul: int)
Grid = tuple  # tuple of dims, each a tuple of GridTerm
BINDINGS = ("tensor", "sym", "int", "float")
STEPS = ("any", "prefill", "decode")


class IndexFormatError(ValueError):
    """index.json is not what this version writes."""


def eval_grid(grid: Sequence[Sequence[Sequence]], env: Mapping[str, int]) -> tuple[int, ...]:
    """The grid's dims for a step's symbols (as many dims as the grid has)."""
    return tuple(sum(mul if sym is None else -(-env[sym] // div) * mul for sym, div, mul in dim) for dim in grid)


def _need(d: Any, key: str, kind: type, where: str) -> Any:
    """``d[key]`` if it is a ``kind`` (a bool is no int here), else IndexFormatError."""
    value = d.get(key) if isinstance(d, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise IndexFormatError(f"{where} has no valid {key!r}")
    return value


@dataclass(frozen=True)
class Binary:
    """One compiled kernel: its file beside index.json and what the driver needs to launch it."""

    file: str
    name: str  # the entry point
    num_warps: int
    shared: int  # bytes of dynamic shared memory
    warp_size: int = 32
    num_ctas: int = 1
    global_scratch_size: int = 0  # bytes per program of Triton's own scratch
    global_scratch_align: int = 1
    profile_scratch_size: int = 0
    profile_scratch_align: int = 1
    pdl: bool = False  # built with griddepcontrol: launched with programmatic dependent launch where asked
    # What it was built from (the interpreter backend re-runs the jit source; `runtime inspect` shows them).
    module: str = ""
    kernel: str = ""
    source_hash: str = ""
    config: dict = field(default_factory=dict)
    constexprs: dict = field(default_factory=dict)

    INTS = ("num_warps", "shared", "warp_size", "num_ctas", "global_scratch_size", "global_scratch_align",
            "profile_scratch_size", "profile_scratch_align")

    @classmethod
    def from_json(cls, d: Any, where: str) -> Binary:
        for key in ("file", "name"):
            _need(d, key, str, where)
        for key in ("num_warps", "shared"):
            _need(d, key, int, where)
        kw = {k: d[k] for k in cls.INTS if k in d}
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in kw.values()):
            raise IndexFormatError(f"{where} has a negative or non-integer size")
        return cls(file=d["file"], name=d["name"], pdl=bool(d.get("pdl", False)), module=str(d.get("module", "")),
                   kernel=str(d.get("kernel", "")), source_hash=str(d.get("source_hash", "")),
                   config=dict(d.get("config") or {}), constexprs=dict(d.get("constexprs") or {}), **kw)

    def to_json(self) -> dict:
        return {"file": self.file, "name": self.name, "pdl": self.pdl, "module": self.module, "kernel": self.kernel,
                "source_hash": self.source_hash, "config": self.config, "constexprs": self.constexprs,
                **{k: getattr(self, k) for k in self.INTS}}


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "*fp16" (a pointer), "i32", "i64", "fp32", ...
    kind: str  # one of BINDINGS
    value: Any  # role, symbol name, int or float

    @classmethod
    def from_json(cls, p: Any, where: str) -> Param:
        ok = isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and isinstance(p[1], str) \
            and isinstance(p[2], list) and len(p[2]) == 2 and p[2][0] in BINDINGS
        if not ok:
            raise IndexFormatError(f"{where} has a malformed parameter {str(p)[:60]}")
        return cls(p[0], p[1], p[2][0], p[2][1])

    def to_json(self) -> list:
        return [self.name, self.type, [self.kind, self.value]]


@dataclass(frozen=True)
class Launch:
    binary: str  # key into KernelIndex.binaries
    params: tuple[Param, ...]
    grid: Grid

    @classmethod
    def from_json(cls, d: Any, where: str) -> Launch:
        key = _need(d, "binary", str, where)
        params = tuple(Param.from_json(p, where) for p in _need(d, "params", list, where))
        grid = _need(d, "grid", list, where)
        try:
            grid = tuple(tuple((sym, int(div), int(mul)) for sym, div, mul in dim) for dim in grid)
            eval_grid(grid, {"T": 1, "S": 1, "R": 1})
        except (TypeError, ValueError, KeyError, ZeroDivisionError):
            raise IndexFormatError(f"{where} has a grid the runtime cannot evaluate") from None
        return cls(key, params, grid)

    def to_json(self) -> dict:
        return {"binary": self.binary, "params": [p.to_json() for p in self.params],
                "grid": [[list(term) for term in dim] for dim in self.grid]}


@dataclass(frozen=True)
class Variant:
    """The launches of a node for one step kind and token bucket (T <= max_T; None: any T)."""

    step: str  # one of STEPS
    max_T: int | None
    scratch: dict  # role -> (numel, dtype name)
    launches: tuple[Launch, ...]

    @classmethod
    def from_json(cls, d: Any, where: str) -> Variant:
        step = _need(d, "step", str, where)
        max_T = d.get("max_T")
        if step not in STEPS or not (max_T is None or isinstance(max_T, int)):
            raise IndexFormatError(f"{where} has an invalid step or max_T")
        scratch = d.get("scratch", {})
        if not isinstance(scratch, dict) or not all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], int)
                                                    and isinstance(s[1], str) for s in scratch.values()):
            raise IndexFormatError(f"{where} has malformed scratch")
        launches = tuple(Launch.from_json(x, where) for x in _need(d, "launches", list, where))
        return cls(step, max_T, {r: (n, dt) for r, (n, dt) in scratch.items()}, launches)

    def to_json(self) -> dict:
        return {"step": self.step, "max_T": self.max_T, "scratch": {r: list(s) for r, s in self.scratch.items()},
                "launches": [x.to_json() for x in self.launches]}


@dataclass(frozen=True)
class Entry:
    """A graph node's kernels (or an extra such as sampling, which no graph node makes)."""

    node: str
    op: str
    variants: tuple[Variant, ...]

    @classmethod
    def from_json(cls, d: Any, where: str) -> Entry:
        node = _need(d, "node", str, where)
        here = f"{where}, node {node}"
        return cls(node, _need(d, "op", str, here),
                   tuple(Variant.from_json(v, here) for v in _need(d, "variants", list, here)))

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "variants": [v.to_json() for v in self.variants]}


@dataclass(frozen=True)
class KernelIndex:
    target: str
    triton: str  # the Triton version that compiled the binaries
    binaries: dict[str, Binary]
    nodes: tuple[Entry, ...]  # in graph order
    extra: dict[str, Entry]

    def entries(self) -> list[Entry]:
        return [*self.nodes, *self.extra.values()]

    @classmethod
    def from_json(cls, d: Any) -> KernelIndex:
        where = "index.json"
        listed = _need(d, "binaries", dict, where)
        binaries = {k: Binary.from_json(b, f"{where}, binary {k}") for k, b in listed.items()}
        nodes = tuple(Entry.from_json(e, where) for e in _need(d, "nodes", list, where))
        extra = {k: Entry.from_json(e, where) for k, e in (d.get("extra") or {}).items()}
        index = cls(str(d.get("target", "")), str(d.get("triton", "")), binaries, nodes, extra)
        missing = sorted({x.binary for e in index.entries() for v in e.variants for x in v.launches} - set(binaries))
        if missing:
            raise IndexFormatError(f"{where} launches binaries it does not list ({', '.join(missing[:3])})")
        return index

    def to_json(self) -> dict:
        return {"target": self.target, "triton": self.triton,
                "binaries": {k: b.to_json() for k, b in self.binaries.items()},
                "nodes": [e.to_json() for e in self.nodes], "extra": {k: e.to_json() for k, e in self.extra.items()}}
