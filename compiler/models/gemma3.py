"""Gemma 3 (text): Gemma 2's decoder with a (1 + w) RMSNorm on every q and k head before RoPE, local and global
RoPE tables (rope_local_base_freq on sliding layers, rope_theta and any rope_scaling on full ones, see
Model.rope_table) and the sliding layers of sliding_window_pattern / layer_types. No attention soft-capping:
transformers' Gemma 3 attention never applies attn_logit_softcapping (ModelConfig leaves it off)."""

from __future__ import annotations

from compiler import ops
from compiler.models import Model, gemma2, llama
from compiler.ops import Sym


def qkv_projection(m: Model, p: str, h: Sym) -> Sym:
    return ops.qk_norm(llama.qkv_projection(m, p, h), m.offset_norm_weight(p + "self_attn.q_norm"),
                       m.offset_norm_weight(p + "self_attn.k_norm"), eps=m.cfg.eps, **m.heads)


def forward(m: Model) -> Sym:
    """ids [T] -> logits [R, V] fp32."""
    return gemma2.forward(m, qkv_projection)
