"""Qwen3-MoE: the Qwen3 decoder (q/k norms) with sparse MLPs of top-k experts, renormalised where norm_topk_prob
says; layers listed in mlp_only_layers or off the decoder_sparse_step grid keep a dense SwiGLU MLP."""

from __future__ import annotations

from compiler.models import Model, moe, qwen3
from compiler.ops import Sym


def sparse_block(m: Model, p: str, hidden: Sym, residual: Sym) -> tuple[Sym, Sym | None]:
    return moe.moe_block(m, p, hidden, residual, "mlp.gate", ("mlp.experts", "gate_proj", "up_proj", "down_proj"))


def forward(m: Model) -> Sym:
    """ids [T] -> logits [R, V]."""
    return moe.forward(m, qwen3.attention_block, sparse_block)
