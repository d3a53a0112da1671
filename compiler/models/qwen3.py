"""Qwen3: the Llama decoder with an RMSNorm on every q and k head before RoPE, and no qkv bias."""

from __future__ import annotations

from compiler import ops
from compiler.models import Model, llama
from compiler.ops import Sym


def attention_block(m: Model, p: str, i: int, hidden: Sym, residual: Sym | None) -> tuple[Sym, Sym]:
    residual = hidden if residual is None else ops.add(hidden, residual, name="attn_in")
    h = ops.rms_norm(residual, m.weight(p + "input_layernorm"), m.cfg.eps)
    qkv = ops.qk_norm(llama.qkv_projection(m, p, h), m.weight(p + "self_attn.q_norm"),
                      m.weight(p + "self_attn.k_norm"), eps=m.cfg.eps, **m.heads)
    return llama.attend(m, p, i, qkv), residual


def forward(m: Model) -> Sym:
    """ids [T] -> logits [R, V]."""
    return llama.forward(m, attention_block)
