"""The static graph: frozen dataclasses, shapes over step symbols, SSA tensor names.

No triton import here: the runtime reads graphs with this module too.

Shapes are tuples of ints and symbol names: "T" (tokens in the step), "S" (sequences in the step),
"S+1", and "NB" (blocks in the paged KV cache, fixed when the runtime sizes its cache).

Tensor kinds:
  input       filled by the runtime before every step (ids, positions, slot_mapping, ...)
  weight      a value in weights.safetensors (same name)
  cache       persistent per-layer KV cache blocks, owned by the runtime
  activation  produced by one node, placed in the activation arena by the memory plan
  output      what a step returns (logits)

In-place ops (docs/ops.md) produce a new SSA name that the memory plan maps onto the input's buffer;
``Node.aliases`` records (output role, input role) pairs that must share storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

Dim = int | str
STEP_INPUTS = ("ids", "positions", "slot_mapping", "cu_seqlens_q", "seq_lens", "block_tables", "last_idx")
KINDS = ("input", "weight", "cache", "activation", "output")

# Which output role of an in-place op shares storage with which input role.
INPLACE: dict[str, tuple[tuple[str, str], ...]] = {
    "rope": (("qkv", "qkv"),),
    "kv_cache_write": (("k_cache", "k_cache"), ("v_cache", "v_cache")),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "fp32" | "fp16" | "bf16" | "i32" | "i64"
    shape: tuple[Dim, ...]
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"tensor {self.name}: kind {self.kind!r} is not one of {KINDS}")


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[tuple[str, str], ...]  # (role, tensor name)
    outputs: tuple[tuple[str, str], ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    name: str = ""

    def input(self, role: str) -> str | None:
        return dict(self.inputs).get(role)

    def output(self, role: str) -> str | None:
        return dict(self.outputs).get(role)

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)

    @property
    def aliases(self) -> tuple[tuple[str, str], ...]:
        return INPLACE.get(self.op, ())

    def with_attrs(self, **kw: Any) -> Node:
        return replace(self, attrs=tuple(sorted({**dict(self.attrs), **kw}.items())))


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    tensors: tuple[TensorSpec, ...]
    outputs: tuple[str, ...] = ("logits",)
    # Model-level facts the runtime needs (num_layers, num_kv_heads, head_dim, block_size, vocab_size, ...).
    meta: tuple[tuple[str, Any], ...] = field(default=())

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def by_kind(self, kind: str) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.kind == kind)

    def get_meta(self, key: str, default: Any = None) -> Any:
        return dict(self.meta).get(key, default)

    def validate(self) -> None:
        """Every node input is defined before use, every name is produced once (SSA)."""
        names = {t.name for t in self.tensors}
        defined = {t.name for t in self.tensors if t.kind in ("input", "weight", "cache")}
        for node in self.nodes:
            for role, name in node.inputs:
                if name not in defined:
                    raise ValueError(f"{node.op} {node.name}: input {role}={name} is used before it is produced")
            for role, name in node.outputs:
                if name in defined:
                    raise ValueError(f"{node.op} {node.name}: output {role}={name} is produced twice")
                if name not in names:
                    raise ValueError(f"{node.op} {node.name}: output {name} has no TensorSpec")
                defined.add(name)
        for name in self.outputs:
            if name not in defined:
                raise ValueError(f"graph output {name} is never produced")
