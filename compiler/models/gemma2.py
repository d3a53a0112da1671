"""Gemma 2: the Llama decoder with sandwich norms, GeGLU, (1 + w) RMSNorms, scaled embeddings and soft-capping.

Per block, as Gemma2DecoderLayer: out = x + post_norm(sublayer(pre_norm(x))) for attention and MLP alike, so the
residual add comes after a norm rather than a linear: the passes make it that norm's epilogue (rms_norm with
has_residual), and the next pre-norm folds into the linear after it as ever. Every norm weight is 1 + w, folded
at compile time (Model.offset_norm_weight). The embedding rows are scaled by sqrt(hidden_size) in the model dtype,
as HF does, inside the embedding kernel: the table is tied to the lm_head, which must see it unscaled.
Attention scores are scaled by query_pre_attn_scalar ** -0.5 and soft-capped (attn_logit_softcapping), the
logits soft-capped too (final_logit_softcapping); even layers slide (the window is in Model.windows).
"""

from __future__ import annotations

import math

import torch

from compiler import ops
from compiler.models import Model, llama
from compiler.ops import Sym

_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def norm(m: Model, x: Sym, prefix: str, name: str) -> Sym:
    return ops.rms_norm(x, m.offset_norm_weight(prefix), m.cfg.eps, name=name)


def attend(m: Model, p: str, i: int, qkv: Sym) -> Sym:
    """Rotate q and k by layer i's table, write the cache, attend (window, softcap), project out: [T, D]."""
    qkv = ops.rope(qkv, m.positions, m.rope_table(i), eps=m.cfg.eps, **m.heads)
    k_cache, v_cache = ops.kv_cache_write(qkv, m.slot_mapping, m.k_cache[i], m.v_cache[i], **m.heads)
    o = ops.attention(qkv, k_cache, v_cache, m.cu_seqlens_q, m.seq_lens, m.block_tables, scale=m.cfg.scale,
                      window=m.windows[i], softcap=m.cfg.attn_softcap, **m.heads)
    return ops.linear(o, m.weight(p + "self_attn.o_proj"))


def qkv_projection(m: Model, p: str, h: Sym) -> Sym:
    """q, k, v of the normed hidden h side by side: [T, (Hq + 2 Hk) Dh] (Gemma 3 norms q and k heads here)."""
    return llama.qkv_projection(m, p, h)


def block(m: Model, p: str, i: int, x: Sym, qkv_projection=qkv_projection) -> Sym:
    """One decoder layer on the residual stream x [T, D] -> the stream after it."""
    a = attend(m, p, i, qkv_projection(m, p, norm(m, x, p + "input_layernorm", "input_layernorm")))
    x = ops.add(norm(m, a, p + "post_attention_layernorm", "post_attention_layernorm"), x, name="attn_out")
    h = norm(m, x, p + "pre_feedforward_layernorm", "pre_feedforward_layernorm")
    gate = ops.linear(h, m.weight(p + "mlp.gate_proj"))
    up = ops.linear(h, m.weight(p + "mlp.up_proj"))
    mlp = ops.linear(ops.gelu_tanh_mul(ops.concat(gate, up)), m.weight(p + "mlp.down_proj"))
    return ops.add(norm(m, mlp, p + "post_feedforward_layernorm", "post_feedforward_layernorm"), x, name="mlp_out")


def embed_scale(m: Model) -> float:
    """sqrt(hidden_size) rounded to the model dtype, as HF casts its normalizer (sqrt(3072) is 55.5 in bf16)."""
    return float(torch.tensor(math.sqrt(m.cfg.hidden_size)).to(_TORCH[m.tracer.dtype]))


def forward(m: Model, qkv_projection=qkv_projection) -> Sym:
    """ids [T] -> logits [R, V] fp32; Gemma 3 passes its own qkv_projection."""
    x = ops.embedding(m.ids, m.weight("model.embed_tokens"), scale=embed_scale(m))
    for i in range(m.cfg.num_layers):
        with m.scope(f"layers.{i}"):
            x = block(m, f"model.layers.{i}.", i, x, qkv_projection)
    return ops.logits(x, m.offset_norm_weight("model.norm"), m.lm_head(), m.last_idx, eps=m.cfg.eps,
                      softcap=m.cfg.final_softcap)
