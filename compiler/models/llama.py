"""Llama family (Llama 2/3, TinyLlama, SmolLM2, Mistral): pre-norm decoder, GQA, RoPE (neox), SwiGLU MLP.

Each block takes (hidden, residual): hidden is the previous block's output, residual the stream it is
added to (None before the first layer, whose stream starts as the embedding output). The add sits at the
top of the next block, where the passes fold it into the previous linear's epilogue.
"""

from __future__ import annotations

from compiler import ops
from compiler.models import Model
from compiler.ops import Sym


def qkv_projection(m: Model, p: str, h: Sym) -> Sym:
    """q, k, v of the normed hidden h [T, D] side by side: [T, (Hq + 2 Hk) Dh], with biases where they exist."""
    a = p + "self_attn."
    q = ops.linear(h, m.weight(a + "q_proj"), m.bias(a + "q_proj"))
    k = ops.linear(h, m.weight(a + "k_proj"), m.bias(a + "k_proj"))
    v = ops.linear(h, m.weight(a + "v_proj"), m.bias(a + "v_proj"))
    return ops.concat(q, k, v, name="qkv")


def attend(m: Model, p: str, i: int, qkv: Sym) -> Sym:
    """Rotate q and k, write k and v to layer i's cache, attend (within layer i's window), project out: [T, D]."""
    qkv = ops.rope(qkv, m.positions, m.cos_sin, eps=m.cfg.eps, **m.heads)
    k_cache, v_cache = ops.kv_cache_write(qkv, m.slot_mapping, m.k_cache[i], m.v_cache[i], **m.heads)
    o = ops.attention(qkv, k_cache, v_cache, m.cu_seqlens_q, m.seq_lens, m.block_tables,
                      scale=m.cfg.head_dim ** -0.5, window=m.windows[i], **m.heads)
    return ops.linear(o, m.weight(p + "self_attn.o_proj"), m.bias(p + "self_attn.o_proj"))


def attention_block(m: Model, p: str, i: int, hidden: Sym, residual: Sym | None) -> tuple[Sym, Sym]:
    residual = hidden if residual is None else ops.add(hidden, residual, name="attn_in")
    h = ops.rms_norm(residual, m.weight(p + "input_layernorm"), m.cfg.eps)
    return attend(m, p, i, qkv_projection(m, p, h)), residual


def mlp_block(m: Model, p: str, hidden: Sym, residual: Sym) -> tuple[Sym, Sym]:
    residual = ops.add(hidden, residual, name="mlp_in")
    h = ops.rms_norm(residual, m.weight(p + "post_attention_layernorm"), m.cfg.eps)
    return swiglu(m, p + "mlp.", h), residual


def swiglu(m: Model, a: str, h: Sym) -> Sym:
    """down(silu(gate(h)) * up(h)) of the MLP under prefix a (e.g. "model.layers.0.mlp."): [T, D]."""
    gate = ops.linear(h, m.weight(a + "gate_proj"), m.bias(a + "gate_proj"))
    up = ops.linear(h, m.weight(a + "up_proj"), m.bias(a + "up_proj"))
    return ops.linear(ops.mul(ops.silu(gate), up), m.weight(a + "down_proj"), m.bias(a + "down_proj"))


def logits(m: Model, hidden: Sym, residual: Sym | None) -> Sym:
    """Final norm and lm_head on the rows last_idx asks for: [R, V] fp32 (residual None: hidden is the stream)."""
    x = hidden if residual is None else ops.add(hidden, residual, name="final_in")
    x = ops.rms_norm(x, m.weight("model.norm"), m.cfg.eps)
    return ops.linear(ops.gather(x, m.last_idx), m.lm_head(), out_dtype="fp32", name="logits")


def forward(m: Model, attention_block=attention_block, mlp_block=mlp_block) -> Sym:
    """The whole step: ids [T] -> logits [R, V]; the blocks are what a family swaps (Qwen3, Phi-3), mlp_block may
    be a sequence of one block per layer (MoE families with dense layers between the sparse ones)."""
    mlp_blocks = mlp_block if isinstance(mlp_block, (list, tuple)) else (mlp_block,) * m.cfg.num_layers
    hidden, residual = ops.embedding(m.ids, m.weight("model.embed_tokens")), None
    for i in range(m.cfg.num_layers):
        p = f"model.layers.{i}."
        with m.scope(f"layers.{i}"):
            hidden, residual = attention_block(m, p, i, hidden, residual)
            hidden, residual = mlp_blocks[i](m, p, hidden, residual)
    return logits(m, hidden, residual)
