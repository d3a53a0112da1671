"""The op API model definitions are written against, and the tracer that records a run of them as a Graph.

A model definition calls these functions on symbolic tensors (``Sym``: a name, a dtype and a shape over the
step symbols); each call checks shapes, records one Node and returns the symbolic result. The traced graph
is the model's plain maths: three linears for q, k and v, silu and mul for the MLP, explicit residual adds.
compiler.passes then fuses it into the kernel ops of docs/ops.md.

Ops that exist only before the passes run (no kernel):
  add(a, b), mul(a, b), silu(x)        elementwise over [rows, D]
  concat(x0, x1, ...)                  columns side by side: [rows, D0 + D1 + ...]
  qk_norm(qkv, q_norm, k_norm)         RMSNorm of every q and k head by its weight (Qwen3); v untouched
  gather(x, idx)                       rows of x: [len(idx), D]
The others (embedding, rms_norm, linear, silu_mul, gelu_tanh_mul, rope, kv_cache_write, attention, logits, moe) are
traced as the kernel ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from artifact_format.graph import INPLACE, Dim, Graph, Node, TensorSpec

BASIC_OPS = ("add", "mul", "silu", "concat", "qk_norm", "gather")


@dataclass(frozen=True)
class Sym:
    """A symbolic tensor of the trace: shape over ints and step symbols ("T", "S", "R", "S+1", "NB")."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    tracer: Tracer = field(compare=False, repr=False)


def node_label(weight_name: str) -> str:
    """Node name for an op applied with a weight: "model.layers.0.mlp.up_proj.weight" -> "layers.0.mlp.up_proj"."""
    name = weight_name.removesuffix(".weight")
    return name.removeprefix("model.")


class Tracer:
    """Collects the nodes, tensor specs and weight values of one trace."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.nodes: list[Node] = []
        self.specs: dict[str, TensorSpec] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self._scope = ""

    def source(self, name: str, dtype: str, shape: tuple[Dim, ...], kind: str) -> Sym:
        """A tensor no node produces: a step input or a KV cache."""
        self._add(TensorSpec(name, dtype, tuple(shape), kind))
        return Sym(name, dtype, tuple(shape), self)

    def weight(self, name: str, value: torch.Tensor, dtype: str | None = None) -> Sym:
        """A weight, kept in its checkpoint dtype until the passes cast it; asking twice gives the same tensor.

        No fp32 copy: a bf16 checkpoint of 8B parameters would take 32 GB that way, and merges and permutations
        are exact in any dtype (folds compute in fp32 themselves).
        """
        if name not in self.specs:
            self.weights[name] = value.detach().contiguous()
            self._add(TensorSpec(name, dtype or self.dtype, tuple(value.shape), "weight"))
        spec = self.specs[name]
        return Sym(name, spec.dtype, spec.shape, self)

    @contextlib.contextmanager
    def scope(self, prefix: str) -> Iterator[None]:
        """Names weightless nodes recorded inside as "{prefix}.{op}" (e.g. layers.3.rope)."""
        old, self._scope = self._scope, prefix
        try:
            yield
        finally:
            self._scope = old

    def emit(self, op: str, inputs: dict[str, Sym | None], outputs: dict[str, tuple[str, tuple[Dim, ...]]],
             attrs: dict[str, Any] | None = None, name: str | None = None) -> tuple[Sym, ...]:
        """Record one node; inputs that are None (absent optional roles) are left out."""
        present = {role: sym for role, sym in inputs.items() if sym is not None}
        node_name = self._unique(self._node_name(op, present, name))
        aliases = dict(INPLACE.get(op, ()))
        syms = []
        for role, (dtype, shape) in outputs.items():
            tname = node_name if len(outputs) == 1 else f"{node_name}.{role}"
            src = present.get(aliases.get(role, ""))
            kind = "cache" if src is not None and self.specs[src.name].kind == "cache" else "activation"
            self._add(TensorSpec(tname, dtype, tuple(shape), kind))
            syms.append(Sym(tname, dtype, tuple(shape), self))
        self.nodes.append(Node(op, tuple((r, s.name) for r, s in present.items()),
                               tuple((r, s.name) for r, s in zip(outputs, syms)),
                               tuple(sorted((attrs or {}).items())), node_name))
        return tuple(syms)

    def graph(self, outputs: dict[str, Sym], meta: dict[str, Any]) -> Graph:
        """The traced Graph; ``outputs`` maps each graph output name to the Sym of that name."""
        for out_name, sym in outputs.items():
            if sym.name != out_name:
                raise ValueError(f"graph output {out_name} is traced as {sym.name}: name the op that makes it")
            spec = self.specs[out_name]
            self.specs[out_name] = TensorSpec(spec.name, spec.dtype, spec.shape, "output")
        g = Graph(tuple(self.nodes), tuple(self.specs.values()), tuple(outputs), tuple(sorted(meta.items())))
        g = g.canonical()
        g.validate()
        return g

    def _add(self, spec: TensorSpec) -> None:
        if spec.name in self.specs:
            raise ValueError(f"tensor {spec.name} is defined twice in the trace")
        self.specs[spec.name] = spec

    def _node_name(self, op: str, inputs: dict[str, Sym], name: str | None) -> str:
        weight = inputs.get("w") or inputs.get("weight")
        if name is None and weight is not None and self.specs[weight.name].kind == "weight":
            return node_label(weight.name)
        label = name or op
        return f"{self._scope}.{label}" if self._scope else label

    def _unique(self, name: str) -> str:
        taken = {n.name for n in self.nodes} | set(self.specs)
        out, i = name, 0
        while out in taken:
            i += 1
            out = f"{name}.{i}"
        return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _rows(x: Sym, what: str) -> Dim:
    _check(len(x.shape) == 2, f"{what}: {x.name} must be 2-D [rows, width], not {x.shape}")
    return x.shape[0]


def embedding(ids: Sym, weight: Sym, scale: float = 1.0) -> Sym:
    """ids [T] i32, weight [V, D] -> weight[ids] * scale: [T, D].

    scale != 1 (Gemma's sqrt(hidden_size)) multiplies the rows as they are read, so a table tied to the lm_head
    is never scaled itself; only then does the node carry the attr.
    """
    _check(len(ids.shape) == 1 and ids.dtype == "i32", f"embedding: ids must be [T] i32, not {ids.shape} {ids.dtype}")
    _check(len(weight.shape) == 2, f"embedding: weight {weight.name} must be [V, D]")
    return ids.tracer.emit("embedding", {"ids": ids, "weight": weight},
                           {"out": (weight.tracer.dtype, (ids.shape[0], weight.shape[1]))},
                           {"scale": float(scale)} if scale != 1.0 else {})[0]


def rms_norm(x: Sym, w: Sym, eps: float, name: str | None = None) -> Sym:
    """x [rows, D], w [D] -> x / sqrt(mean(x^2) + eps) * w."""
    rows = _rows(x, "rms_norm")
    _check(w.shape == (x.shape[1],), f"rms_norm: weight {w.name} {w.shape} does not match {x.name} {x.shape}")
    return x.tracer.emit("rms_norm", {"x": x, "w": w}, {"out": (x.dtype, (rows, x.shape[1]))},
                         {"eps": float(eps)}, name)[0]


def _elementwise(op: str, a: Sym, b: Sym, name: str | None) -> Sym:
    _check(a.shape == b.shape and a.dtype == b.dtype, f"{op}: {a.name} {a.shape} and {b.name} {b.shape} differ")
    return a.tracer.emit(op, {"a": a, "b": b}, {"out": (a.dtype, a.shape)}, {}, name)[0]


def add(a: Sym, b: Sym, name: str | None = None) -> Sym:
    """a + b, same shapes."""
    return _elementwise("add", a, b, name)


def mul(a: Sym, b: Sym, name: str | None = None) -> Sym:
    """a * b, same shapes."""
    return _elementwise("mul", a, b, name)


def silu(x: Sym, name: str | None = None) -> Sym:
    """x * sigmoid(x)."""
    return x.tracer.emit("silu", {"x": x}, {"out": (x.dtype, x.shape)}, {}, name)[0]


def silu_mul(x: Sym, name: str | None = None) -> Sym:
    """x [rows, 2I] gate columns then up columns -> silu(gate) * up: [rows, I] (checkpoints with a fused gate_up)."""
    rows = _rows(x, "silu_mul")
    _check(isinstance(x.shape[1], int) and x.shape[1] % 2 == 0, f"silu_mul: {x.name} {x.shape} has no even width")
    return x.tracer.emit("silu_mul", {"x": x}, {"out": (x.dtype, (rows, x.shape[1] // 2))}, {}, name)[0]


def gelu_tanh_mul(x: Sym, name: str | None = None) -> Sym:
    """x [rows, 2I] gate columns then up columns -> gelu_tanh(gate) * up: [rows, I] (GeGLU)."""
    rows = _rows(x, "gelu_tanh_mul")
    _check(isinstance(x.shape[1], int) and x.shape[1] % 2 == 0, f"gelu_tanh_mul: {x.name} {x.shape} has no even width")
    return x.tracer.emit("gelu_tanh_mul", {"x": x}, {"out": (x.dtype, (rows, x.shape[1] // 2))}, {}, name)[0]


def linear(x: Sym, w: Sym, b: Sym | None = None, out_dtype: str | None = None, name: str | None = None) -> Sym:
    """x [rows, K], w [N, K], b [N] -> x @ w^T + b: [rows, N] in out_dtype (default x's)."""
    rows = _rows(x, "linear")
    _check(len(w.shape) == 2 and w.shape[1] == x.shape[1],
           f"linear: weight {w.name} {w.shape} does not take {x.name} {x.shape}")
    _check(b is None or b.shape == (w.shape[0],), f"linear: bias {b and b.name} does not match {w.name} {w.shape}")
    return x.tracer.emit("linear", {"x": x, "w": w, "bias": b}, {"out": (out_dtype or x.dtype, (rows, w.shape[0]))},
                         {"has_bias": b is not None, "has_residual": False}, name)[0]


def concat(*xs: Sym, name: str | None = None) -> Sym:
    """x_i [rows, D_i] -> [rows, sum D_i], columns in argument order."""
    rows = {_rows(x, "concat") for x in xs}
    _check(len(rows) == 1 and len({x.dtype for x in xs}) == 1, f"concat: {[x.name for x in xs]} differ in rows/dtype")
    width = sum(x.shape[1] for x in xs)
    return xs[0].tracer.emit("concat", {f"x{i}": x for i, x in enumerate(xs)},
                             {"out": (xs[0].dtype, (rows.pop(), width))}, {}, name)[0]


def _check_qkv(qkv: Sym, op: str, num_q_heads: int, num_kv_heads: int, head_dim: int) -> Dim:
    rows = _rows(qkv, op)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    _check(qkv.shape[1] == width, f"{op}: {qkv.name} is {qkv.shape[1]} wide, (Hq + 2 Hk) * Dh = {width}")
    return rows


def qk_norm(qkv: Sym, q_norm: Sym, k_norm: Sym, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
            eps: float) -> Sym:
    """qkv [T, (Hq + 2 Hk) Dh] -> the same with each q head RMS-normed by q_norm [Dh], each k head by k_norm."""
    rows = _check_qkv(qkv, "qk_norm", num_q_heads, num_kv_heads, head_dim)
    _check(q_norm.shape == (head_dim,) and k_norm.shape == (head_dim,), "qk_norm: q_norm and k_norm must be [Dh]")
    heads = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "eps": float(eps)}
    return qkv.tracer.emit("qk_norm", {"qkv": qkv, "q_norm": q_norm, "k_norm": k_norm},
                           {"out": (qkv.dtype, (rows, qkv.shape[1]))}, heads)[0]


def rope(qkv: Sym, positions: Sym, cos_sin: Sym, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
         eps: float, is_neox: bool = True) -> Sym:
    """Rotate the q and k heads of qkv [T, (Hq + 2 Hk) Dh] by positions [T] (in place).

    cos_sin [max_pos, Dr] fp32 holds cos in its first Dr/2 columns and sin in the last; Dr is the rotary dim.
    """
    rows = _check_qkv(qkv, "rope", num_q_heads, num_kv_heads, head_dim)
    rotary_dim = cos_sin.shape[1]
    _check(isinstance(rotary_dim, int) and rotary_dim % 2 == 0 and rotary_dim <= head_dim,
           f"rope: cos_sin is {cos_sin.shape}, its width must be an even rotary dim <= head_dim {head_dim}")
    attrs = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
             "rotary_dim": rotary_dim, "is_neox": is_neox, "use_qk_norm": False, "eps": float(eps)}
    return qkv.tracer.emit("rope", {"qkv": qkv, "positions": positions, "cos_sin": cos_sin},
                           {"qkv": (qkv.dtype, (rows, qkv.shape[1]))}, attrs)[0]


def kv_cache_write(qkv: Sym, slot_mapping: Sym, k_cache: Sym, v_cache: Sym, *, num_q_heads: int, num_kv_heads: int,
                   head_dim: int) -> tuple[Sym, Sym]:
    """Scatter the k and v heads of qkv into the paged caches [NB, block_size, Hk, Dh] at slot_mapping [T]."""
    _check_qkv(qkv, "kv_cache_write", num_q_heads, num_kv_heads, head_dim)
    _check(k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim),
           f"kv_cache_write: caches must be [NB, block_size, {num_kv_heads}, {head_dim}], not {k_cache.shape}")
    attrs = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
             "block_size": k_cache.shape[1]}
    k, v = qkv.tracer.emit("kv_cache_write",
                           {"qkv": qkv, "slot_mapping": slot_mapping, "k_cache": k_cache, "v_cache": v_cache},
                           {"k_cache": (k_cache.dtype, k_cache.shape), "v_cache": (v_cache.dtype, v_cache.shape)},
                           attrs)
    return k, v


def attention(qkv: Sym, k_cache: Sym, v_cache: Sym, cu_seqlens_q: Sym, seq_lens: Sym, block_tables: Sym, *,
              num_q_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int = 0,
              softcap: float = 0.0) -> Sym:
    """Causal GQA attention of qkv's q heads over the paged caches (already holding this step's k, v).

    -> [T, Hq Dh]. Query i of sequence s sits at position p = seq_lens[s] - q_len + i; with window > 0 it sees
    only keys at positions > p - window (a sliding window, as transformers masks it). softcap > 0 caps each
    scaled score s as softcap * tanh(s / softcap) before the mask and softmax (Gemma 2).
    """
    rows = _check_qkv(qkv, "attention", num_q_heads, num_kv_heads, head_dim)
    _check(isinstance(window, int) and window >= 0, f"attention: window must be an int >= 0, not {window!r}")
    _check(softcap >= 0, f"attention: softcap must be >= 0, not {softcap!r}")
    attrs = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
             "block_size": k_cache.shape[1], "scale": float(scale), "max_blocks": block_tables.shape[1]}
    if window:
        # Only a windowed node carries the attr: full-attention graphs, and the tuning keys built from their
        # attrs, stay as they were. The same for softcap.
        attrs["window"] = window
    if softcap:
        attrs["softcap"] = float(softcap)
    return qkv.tracer.emit("attention", {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache,
                                         "cu_seqlens_q": cu_seqlens_q, "seq_lens": seq_lens,
                                         "block_tables": block_tables},
                           {"out": (qkv.dtype, (rows, num_q_heads * head_dim))}, attrs)[0]


def gather(x: Sym, idx: Sym, name: str | None = None) -> Sym:
    """x [T, D], idx [R] i32 -> x[idx]: [R, D]."""
    _rows(x, "gather")
    _check(len(idx.shape) == 1 and idx.dtype == "i32", f"gather: idx must be 1-D i32, not {idx.shape} {idx.dtype}")
    return x.tracer.emit("gather", {"x": x, "idx": idx}, {"out": (x.dtype, (idx.shape[0], x.shape[1]))}, {}, name)[0]


def logits(x: Sym, norm_w: Sym, weight: Sym, last_idx: Sym, *, eps: float, softcap: float = 0.0) -> Sym:
    """Final norm and lm_head of the rows last_idx [R] picks: rms_norm(x[last_idx]) * norm_w @ weight^T, [R, V] fp32.

    The fused form fuse_logits makes of rms_norm -> gather -> linear, traced directly by a family whose logits are
    soft-capped (softcap > 0: cap * tanh(logits / cap), Gemma); only then does the node carry the attr.
    """
    _check(len(last_idx.shape) == 1 and last_idx.dtype == "i32", "logits: last_idx must be 1-D i32")
    _check(norm_w.shape == (x.shape[1],) and len(weight.shape) == 2 and weight.shape[1] == x.shape[1],
           f"logits: {x.name} {x.shape}, norm_w {norm_w.shape} and weight {weight.shape} do not fit")
    _check(softcap >= 0, f"logits: softcap must be >= 0, not {softcap!r}")
    attrs = {"eps": float(eps), **({"softcap": float(softcap)} if softcap else {})}
    return x.tracer.emit("logits", {"x": x, "norm_w": norm_w, "weight": weight, "last_idx": last_idx},
                         {"out": ("fp32", (last_idx.shape[0], weight.shape[0]))}, attrs, "logits")[0]


def moe(x: Sym, router: Sym, w13: Sym, w2: Sym, residual: Sym, shared: Sym | None = None,
        shared_gate: Sym | None = None, *, top_k: int, renormalize: bool, name: str | None = None) -> Sym:
    """Mixture-of-experts SwiGLU MLP plus the residual: x [T, D] (normed), router [E, D], w13 [E, 2I, D] (each
    expert's gate rows, then its up rows), w2 [E, D, I], residual [T, D] -> residual + sum over the top_k experts
    of softmax(x @ router^T) (renormalised over the top_k with ``renormalize``) times down(silu(gate) * up): [T, D].
    With shared [T, D] (a shared expert's output, Qwen2-MoE) and shared_gate [1, D], sigmoid(x @ shared_gate^T) *
    shared is added too.
    """
    rows = _rows(x, "moe")
    E, D = len(router.shape) == 2 and router.shape[0], x.shape[1]
    _check(router.shape == (E, D), f"moe: router {router.name} {router.shape} does not take {x.name} {x.shape}")
    _check(len(w13.shape) == 3 and w13.shape[0] == E and w13.shape[2] == D and w13.shape[1] % 2 == 0,
           f"moe: w13 {w13.name} {w13.shape} is not [E={E}, 2I, D={D}]")
    _check(w2.shape == (E, D, w13.shape[1] // 2), f"moe: w2 {w2.name} {w2.shape} is not [E, D, I] of w13 {w13.shape}")
    _check(residual.shape == x.shape and residual.dtype == x.dtype, f"moe: residual {residual.shape} is not {x.shape}")
    _check(isinstance(top_k, int) and 1 <= top_k <= E, f"moe: top_k {top_k!r} must be between 1 and {E} experts")
    _check((shared is None) == (shared_gate is None), "moe: a shared expert needs both shared and shared_gate")
    _check(shared is None or (shared.shape == x.shape and shared_gate.shape == (1, D)),
           f"moe: shared must be [T, {D}] and shared_gate [1, {D}]")
    attrs = {"top_k": top_k, "renormalize": bool(renormalize)}
    if shared is not None:  # only then: the graphs and tuning keys of models without one stay as they were
        attrs["has_shared"] = True
    return x.tracer.emit("moe", {"x": x, "router": router, "w13": w13, "w2": w2, "residual": residual,
                                 "shared": shared, "shared_gate": shared_gate},
                         {"out": (x.dtype, (rows, D))}, attrs, name)[0]
