"""The static graph: frozen dataclasses, shapes over step symbols, SSA tensor names.

No triton import here: the runtime reads graphs with this module too.

Shapes are tuples of ints and symbol names: "T" (tokens in the step), "S" (sequences in the step),
"S+1", "R" (rows of logits wanted: each sequence's last token, or every token for full-prompt logits)
and "NB" (blocks in the paged KV cache, fixed when the runtime sizes its cache).

Tensor kinds:
  input       filled by the runtime before every step (ids, positions, slot_mapping, ...)
  weight      a value in weights.safetensors (same name)
  cache       persistent per-layer KV cache blocks, owned by the runtime (graph inputs k_cache.{i} /
              v_cache.{i}, and the SSA names kv_cache_write, rope with write_cache, or the qkv matmul with
              its rope epilogue, gives them after writing: same storage)
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
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "i32": 4, "i64": 8, "i8": 1, "u8": 1}

# Ops a compiled graph may hold: the kernel ops of docs/ops.md, with `attention` standing for
# attention_prefill / attention_decode (the runtime picks per step).
GRAPH_OPS = ("embedding", "rms_norm", "add_rms_norm", "rms_norm_linear", "linear", "rope", "kv_cache_write",
             "attention", "silu_mul", "gelu_tanh_mul", "logits", "rms_norm_gated", "moe")

# The ops whose weight a quantized build (--quant) stores quantized, and their (weight, scale) input roles
# (docs/ops.md): the matmuls, and the embedding table and lm_head, quantized along D as a matmul weight along K.
QUANT_ROLES = {"linear": ("w", "scale"), "rms_norm_linear": ("w", "scale"), "embedding": ("weight", "weight_scale"),
               "logits": ("weight", "weight_scale")}
# Every (weight, scale) pair of each op a quantized build quantizes: QUANT_ROLES' one, and the moe op's two expert
# weights, [E, N, K] stacks quantized expert by expert as matmul weights along K (its router stays unquantized).
QUANT_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    **{op: (pair,) for op, pair in QUANT_ROLES.items()}, "moe": (("w13", "w13_scale"), ("w2", "w2_scale"))}

# Which output role of an in-place op shares storage with which input role.
# rope's cache roles exist only in its cache-writing form (write_cache), where it does kv_cache_write's job; the
# matmuls' only in their rope-epilogue form (act "rope" with write_cache), where they do rope's.
INPLACE: dict[str, tuple[tuple[str, str], ...]] = {
    "rope": (("qkv", "qkv"), ("k_cache", "k_cache"), ("v_cache", "v_cache")),
    "kv_cache_write": (("k_cache", "k_cache"), ("v_cache", "v_cache")),
    "linear": (("k_cache", "k_cache"), ("v_cache", "v_cache")),
    "rms_norm_linear": (("k_cache", "k_cache"), ("v_cache", "v_cache")),
}


@dataclass(frozen=True)
class Limits:
    """Static bounds an artifact is compiled for; every activation buffer is sized from them."""

    max_seq_len: int  # tokens one sequence may hold (prompt + generated)
    max_batch: int  # sequences in one step
    max_num_tokens: int  # tokens in one step (prefill chunk)
    block_size: int = 16  # tokens per paged KV-cache block

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "max_batch", "max_num_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, not {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"Limits.block_size must be a power of two, not {self.block_size}")
        if self.max_num_tokens < self.max_batch:
            raise ValueError(f"Limits.max_num_tokens ({self.max_num_tokens}) must be at least max_batch "
                             f"({self.max_batch}): a decode step carries one token per sequence")

    @property
    def max_blocks(self) -> int:
        """Width of a block table: blocks one sequence of max_seq_len tokens needs."""
        return -(-self.max_seq_len // self.block_size)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "fp32" | "fp16" | "bf16" | "i32" | "i64" | "i8" (int8-quantized weights) | "u8" (packed int4 weights)
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
        """(output role, input role) pairs sharing storage, for the optional roles this node has."""
        return tuple((o, i) for o, i in INPLACE.get(self.op, ()) if o in dict(self.outputs))

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

    def sources(self, kind: str | None = None) -> tuple[TensorSpec, ...]:
        """Tensors no node produces (of ``kind`` if given): the caches to allocate are sources("cache")."""
        produced = {name for node in self.nodes for _, name in node.outputs}
        return tuple(t for t in self.tensors if t.name not in produced and kind in (None, t.kind))

    def producers(self) -> dict[str, Node]:
        return {name: node for node in self.nodes for _, name in node.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        """Tensor name -> the nodes reading it, in node order."""
        out: dict[str, list[Node]] = {}
        for node in self.nodes:
            for _, name in node.inputs:
                out.setdefault(name, []).append(node)
        return out

    def storage(self, name: str) -> str:
        """The tensor whose buffer ``name`` lives in: follows in-place aliases back to their first name."""
        producers = self.producers()
        while name in producers:
            node = producers[name]
            role = next(r for r, n in node.outputs if n == name)
            src = dict(node.aliases).get(role)
            if src is None:
                break
            name = node.input(src)
        return name

    def canonical(self) -> Graph:
        """The same graph with its tensors listed sources first (in their order), then in production order.

        Sources are the tensors no node produces (inputs, caches, weights). Traces, passes and ONNX import
        all produce this order, which makes graphs comparable with ==.
        """
        produced = {name: i for i, name in enumerate(n for node in self.nodes for _, n in node.outputs)}
        sources = [t for t in self.tensors if t.name not in produced]
        made = sorted((t for t in self.tensors if t.name in produced), key=lambda t: produced[t.name])
        return replace(self, tensors=tuple(sources + made))

    def validate(self) -> None:
        """Every node input is defined before use, every name is produced once (SSA)."""
        names = {t.name for t in self.tensors}
        if len(names) != len(self.tensors):
            raise ValueError("two TensorSpecs share a name")
        node_names = [n.name for n in self.nodes if n.name]
        if len(set(node_names)) != len(node_names):
            raise ValueError("two nodes share a name")
        produced = {name for node in self.nodes for _, name in node.outputs}
        # Cache tensors a node writes (kv_cache_write, rope, a matmul with the rope epilogue) get new SSA names of
        # kind cache; they are not sources.
        defined = {t.name for t in self.tensors if t.kind in ("input", "weight", "cache") and t.name not in produced}
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
        # An in-place op overwrites its input's buffer, so nothing else may read that input: data
        # dependencies alone would not order such a reader before the overwrite.
        consumers = self.consumers()
        for node in self.nodes:
            for _, role in node.aliases:
                name = node.input(role)
                others = [n.name for n in consumers.get(name, []) if n.name != node.name]
                if others:
                    raise ValueError(f"{node.op} {node.name} overwrites {name} in place, which {others} also read")
