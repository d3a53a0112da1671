"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): the Qwen2 decoder (q/k/v biases where qkv_bias says) with sparse MLPs of
top-k experts plus a shared expert on every sparse layer: a dense SwiGLU MLP whose output, scaled by
sigmoid(shared_expert_gate @ h), the moe node adds to the experts' (Qwen2MoeSparseMoeBlock)."""

from __future__ import annotations

from compiler.models import Model, llama, moe
from compiler.ops import Sym


def sparse_block(m: Model, p: str, hidden: Sym, residual: Sym) -> tuple[Sym, Sym | None]:
    return moe.moe_block(m, p, hidden, residual, "mlp.gate", ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
                         shared="mlp.shared_expert")


def forward(m: Model) -> Sym:
    """ids [T] -> logits [R, V]."""
    return moe.forward(m, llama.attention_block, sparse_block)
