"""Mixtral: the Mistral decoder with a sparse MLP on every layer: top-2 of 8 SwiGLU experts, the routing weights
renormalised over the chosen ones (MixtralTopKRouter). Hub checkpoints keep each expert as w1 (gate), w3 (up) and
w2 (down) under ``block_sparse_moe``; Model.experts stacks them (or takes HF's fused layout as it is)."""

from __future__ import annotations

from compiler.models import Model, llama, moe
from compiler.ops import Sym


def sparse_block(m: Model, p: str, hidden: Sym, residual: Sym) -> tuple[Sym, Sym | None]:
    router = "mlp.gate" if m.has(f"{p}mlp.gate.weight") else "block_sparse_moe.gate"
    return moe.moe_block(m, p, hidden, residual, router, ("block_sparse_moe.experts", "w1", "w3", "w2"))


def forward(m: Model) -> Sym:
    """ids [T] -> logits [R, V]."""
    return moe.forward(m, llama.attention_block, sparse_block)
