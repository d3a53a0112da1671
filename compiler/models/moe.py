"""The sparse MLP block shared by the mixture-of-experts families (Mixtral, Qwen3-MoE).

As llama.mlp_block, the block opens with the residual add (which the passes fold into the o projection's epilogue)
and the post-attention norm; one ``moe`` node then routes each token to its top-k experts and adds their weighted
sum to the residual stream. Having taken the residual itself, it hands back (stream, None): the next block starts
from the stream as the first one starts from the embedding.
"""

from __future__ import annotations

from compiler import ops
from compiler.models import Model, llama
from compiler.ops import Sym


def moe_block(m: Model, p: str, hidden: Sym, residual: Sym, router: str, experts: tuple[str, str, str, str],
              shared: str | None = None) -> tuple[Sym, Sym | None]:
    """router: the gate's checkpoint prefix under p; experts: (legacy prefix, gate, up, down) for Model.experts;
    shared: the prefix of a shared expert, a dense SwiGLU MLP that every token takes (Qwen2-MoE), gated by
    sigmoid("{shared}_gate" @ h) inside the moe node."""
    residual = ops.add(hidden, residual, name="mlp_in")
    h = ops.rms_norm(residual, m.weight(p + "post_attention_layernorm"), m.cfg.eps)
    w13, w2 = m.experts(p, *experts)
    dense = (llama.swiglu(m, f"{p}{shared}.", h), m.weight(f"{p}{shared}_gate")) if shared else (None, None)
    out = ops.moe(h, m.weight(p + router), w13, w2, residual, *dense, top_k=m.cfg.moe.top_k,
                  renormalize=m.cfg.moe.renormalize, name="moe")
    return out, None


def forward(m: Model, attention_block, sparse_block, dense_block=llama.mlp_block) -> Sym:
    """ids [T] -> logits [R, V], with sparse_block on the config's MoE layers and dense_block on the others."""
    return llama.forward(m, attention_block, [sparse_block if s else dense_block for s in m.cfg.moe.sparse])
