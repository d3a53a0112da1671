"""Jit helpers shared by the paged-attention kernels (attention_prefill, attention_decode).

The paged cache is [num_blocks, BLOCK_SIZE, Hk, Dh], contiguous: token n of a sequence lives in physical
block block_table[n // BLOCK_SIZE] at offset n % BLOCK_SIZE. Softmax runs in base 2: scores are scaled by
scale * log2(e) once, so exp2 replaces exp and the log-sum-exp the split-KV decode keeps is in log2 units.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def paged_kv_offsets(
    block_table_ptr,  # [max_blocks] i32: this sequence's row of the block table
    n,  # [BLOCK_N] i32 token positions in the sequence
    mask,  # [BLOCK_N] positions that exist; the others read no table entry
    BLOCK_SIZE: tl.constexpr,
    TOKEN_STRIDE: tl.constexpr,
):
    """Element offset of each token's [Hk, Dh] row in the cache, int64 (caches may pass 2^31 elements)."""
    block = tl.load(block_table_ptr + n // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    return (block * BLOCK_SIZE + n % BLOCK_SIZE) * TOKEN_STRIDE


@triton.jit
def soft_cap(x, CAP: tl.constexpr):
    """CAP * tanh(x / CAP), elementwise in fp32 (Gemma 2's soft-capping of attention scores and of logits).

    From exp, as Triton has no portable tanh: tanh|u| = (1 - e) / (1 + e) with e = exp(-2|u|) in (0, 1], which
    never overflows; the sign goes back on after. Near 0 the subtraction costs relative precision but not absolute
    (~1e-7 * CAP), and an absolute error is what a softmax or a logit sees.
    """
    e = tl.exp(-2.0 * tl.abs(x) / CAP)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t) * CAP


def softcap_constexprs(meta: dict, unit: float = 1.0) -> dict:
    """USE_SOFTCAP / SOFTCAP from a node's ``softcap`` attr (absent: off, and the kernel is the one every other
    model compiles). SOFTCAP is the cap times ``unit``: LOG2E for scores kept in log2 units."""
    cap = float(meta.get("softcap", 0.0))
    assert cap >= 0, f"softcap {cap} must be >= 0 (0: off)"
    return {"USE_SOFTCAP": cap > 0, "SOFTCAP": cap * unit if cap > 0 else 0.0}


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def max_along(x, AXIS: tl.constexpr):
    """tl.max(x, AXIS). tl.max itself is fine on the GPU, but under kernels.spec's interpreter shim its
    bf16-promotion helper is not patched and raises; this is the reduction tl.max lowers to."""
    return tl.reduce(x, AXIS, _maximum)


@triton.jit
def mma(a, b):
    """a @ b with fp32 accumulation.

    fp32 operands multiply in full precision so fp32 models match their reference: the default TF32 would
    round them to 10 mantissa bits, and "ieee" is the one exact mode that the interpreter, NVIDIA and AMD
    all accept (tf32x3 does not compile for AMD, bf16x3 does not interpret).
    """
    if a.dtype == tl.float32:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def online_softmax_step(scores, m_i, l_i, acc, v):
    """Fold one tile of keys into running softmax statistics (FlashAttention-2, base 2).

    scores [M, N] fp32 in log2 units, -inf where a key is masked; m_i, l_i [M] running max and sum
    (m_i starts at -inf); acc [M, BLOCK_D] fp32 unnormalised output; v [N, BLOCK_D].
    Every real query row sees a key in its first tile; a row that has seen none (a tile's padding rows)
    keeps m = -inf, and its max is replaced by 0 in the exponents so that -inf - -inf makes no NaN.
    """
    m_new = tl.maximum(m_i, max_along(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v)
    return m_new, l_i, acc
