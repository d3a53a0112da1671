"""Phi-3 (Phi-3/3.5-mini, Phi-4-mini): the Llama decoder over fused checkpoint matrices.

The checkpoint stores q, k and v as one ``qkv_proj`` (q rows, then k, then v) and gate and up as one
``gate_up_proj`` (gate rows first): exactly the layouts merge_linears would build, so they are used as they are,
with no split and re-merge. silu_mul reads gate from the first half of the columns, which is what Phi3MLP's
``chunk(2)`` does; fuse_swiglu then interleaves the rows for the epilogue as for any gate_up. Partial rotary and
longrope/su scaling live in the rope table (compiler.trace.rope_table), not here.
"""

from __future__ import annotations

from compiler import ops
from compiler.models import Model, llama
from compiler.ops import Sym


def attention_block(m: Model, p: str, i: int, hidden: Sym, residual: Sym | None) -> tuple[Sym, Sym]:
    residual = hidden if residual is None else ops.add(hidden, residual, name="attn_in")
    h = ops.rms_norm(residual, m.weight(p + "input_layernorm"), m.cfg.eps)
    return llama.attend(m, p, i, ops.linear(h, m.weight(p + "self_attn.qkv_proj"))), residual


def mlp_block(m: Model, p: str, hidden: Sym, residual: Sym) -> tuple[Sym, Sym]:
    residual = ops.add(hidden, residual, name="mlp_in")
    h = ops.rms_norm(residual, m.weight(p + "post_attention_layernorm"), m.cfg.eps)
    act = ops.silu_mul(ops.linear(h, m.weight(p + "mlp.gate_up_proj")))
    return ops.linear(act, m.weight(p + "mlp.down_proj")), residual


def forward(m: Model) -> Sym:
    """ids [T] -> logits [R, V]."""
    return llama.forward(m, attention_block, mlp_block)
