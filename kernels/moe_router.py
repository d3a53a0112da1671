"""The moe op's router (kernels/moe.py): softmax top-k routing on the device, one program per token.

logits = x @ router^T over the E experts, rounded to x's dtype (as HF's F.linear leaves them); softmax in fp32; the
TOP_K largest probabilities (ties to the lower expert id, as torch.topk on distinct values), with RENORMALIZE divided
by their sum (Mixtral always, Qwen-MoE where norm_topk_prob says). With HAS_SHARED (Qwen2-MoE) also the shared
expert's gate, sigmoid(x @ shared_gate^T), from the same pass over x.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.spec import Config, Launch, grid_dim, make_launch, ptr


@triton.jit
def _moe_router_kernel(
    x_ptr,  # [T, D]
    router_ptr,  # [E, D]
    shared_gate_ptr,  # [D] the shared expert's gate (Qwen2-MoE); without HAS_SHARED bound to router, never read
    ids_ptr,  # [T, TOP_K] i32
    weights_ptr,  # [T, TOP_K] fp32
    shared_weight_ptr,  # [T] fp32: sigmoid(x @ shared_gate); without HAS_SHARED bound to weights, never written
    T,
    stride_x,
    D: tl.constexpr,
    E: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_SHARED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    e_mask = experts < E
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    acc_shared = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        d_mask = cols < D
        x = tl.load(x_ptr + t * stride_x + cols, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(router_ptr + experts[:, None].to(tl.int64) * D + cols[None, :],
                    mask=e_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
        if HAS_SHARED:
            acc_shared += tl.load(shared_gate_ptr + cols, mask=d_mask, other=0.0).to(tl.float32) * x
    if HAS_SHARED:
        # sigmoid of the gate logit, both rounded to the dtype as HF's F.sigmoid(Linear(x)) leaves them
        gate = tl.sum(acc_shared, axis=0).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(shared_weight_ptr + t, (1.0 / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32))
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(e_mask, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    # Pass 1 sums the TOP_K largest probabilities (for the renormalisation), pass 2 stores them: the k-th is the
    # largest left after the k - 1 before it were set to -1 (probabilities are >= 0, padding experts -1).
    total = 0.0
    left = tl.where(e_mask, p, -1.0)
    for _ in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        total += best
        left = tl.where(experts == tl.min(tl.where(left == best, experts, BLOCK_E), axis=0), -1.0, left)
    scale = 1.0 / total if RENORMALIZE else 1.0
    left = tl.where(e_mask, p, -1.0)
    for k in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        # Clamped: in a row of NaNs no probability equals the max, and the id must still name a real expert, so
        # that the expert kernels never read weights out of bounds.
        idx = tl.minimum(tl.min(tl.where(left == best, experts, BLOCK_E), axis=0), E - 1)
        tl.store(ids_ptr + t * TOP_K + k, idx.to(tl.int32))
        tl.store(weights_ptr + t * TOP_K + k, best * scale)
        left = tl.where(experts == idx, -1.0, left)


def launch(meta: dict, dtypes: dict) -> Launch:
    """The router's launch for the moe node's meta (E, D, top_k, renormalize, has_shared) and dtypes."""
    E, D, top_k = meta["E"], meta["D"], meta["top_k"]
    has_shared = bool(meta.get("has_shared"))
    gate = ("shared_gate", dtypes["shared_gate"]) if has_shared else ("router", dtypes["router"])
    return make_launch(
        _moe_router_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "router_ptr": ptr(dtypes["router"]), "shared_gate_ptr": ptr(gate[1]),
               "ids_ptr": "*i32", "weights_ptr": "*fp32", "shared_weight_ptr": "*fp32", "T": "i32",
               "stride_x": "i64"},
        constexprs={"D": D, "E": E, "TOP_K": top_k, "BLOCK_E": triton.next_power_of_2(E),
                    "BLOCK_D": min(triton.next_power_of_2(D), max(16, 4096 // triton.next_power_of_2(E))),
                    "RENORMALIZE": bool(meta["renormalize"]), "HAS_SHARED": has_shared},
        args={"x_ptr": ("tensor", "x"), "router_ptr": ("tensor", "router"), "shared_gate_ptr": ("tensor", gate[0]),
              "ids_ptr": ("tensor", "topk_ids"), "weights_ptr": ("tensor", "topk_weights"),
              "shared_weight_ptr": ("tensor", "shared_weight" if has_shared else "topk_weights"), "T": ("sym", "T"),
              "stride_x": ("int", meta.get("stride_x", D))},
        grid=[grid_dim(("T", 1, 1))], config=Config.make(num_warps=4, num_stages=1))
