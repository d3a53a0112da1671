"""Logits of each sequence's last token: out[s, :] = (rms_norm(x[last_idx[s]]) * norm_w) @ weight^T, in fp32.

weight is the lm_head or the tied embedding, [V, D], not folded (the embedding shares it). Grid (S, cdiv(V,
BLOCK_V)): a program streams one BLOCK_V slice of weight along D (coalesced) against one sequence's normed
hidden row. Each program recomputes its row's rstd from the same x chunks (D reads of one row: cheap), and
rstd, a per-row scalar, scales the accumulator at the end. Sequences vary fastest in launch order, so the S
programs sharing a weight slice run together and read it from L2, not S times from memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _logits_kernel(
    x_ptr,  # [T, D], hidden states before the final norm
    norm_w_ptr,  # [D]
    weight_ptr,  # [V, D]
    last_idx_ptr,  # [S] i32, row of x holding each sequence's last token
    out_ptr,  # [S, V] fp32
    stride_x,
    stride_out,
    eps,
    D: tl.constexpr,
    V: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    vocab = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = vocab < V
    row = tl.load(last_idx_ptr + seq).to(tl.int64)
    w_rows = weight_ptr + vocab[:, None] * D
    acc = tl.full((BLOCK_V,), 0.0, tl.float32)
    sumsq = tl.full((BLOCK_D,), 0.0, tl.float32)
    for d in range(0, D, BLOCK_D):
        cols = d + tl.arange(0, BLOCK_D)
        d_mask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=d_mask, other=0.0).to(tl.float32)
        g = tl.load(norm_w_ptr + cols, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        sumsq += x * x
        acc += tl.sum(w * (x * g)[None, :], axis=1)
    rstd = 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / D + eps)
    tl.store(out_ptr + seq * stride_out + vocab, acc * rstd, mask=v_mask)


def _config(block_v: int, block_d: int, warps: int) -> Config:
    return Config.make(num_warps=warps, num_stages=3, BLOCK_V=block_v, BLOCK_D=block_d)


def configs(meta: dict) -> list[Config]:
    top_d = max(16, triton.next_power_of_2(meta["D"]))
    return list(dict.fromkeys(_config(bv, min(bd, top_d), w)
                              for bv, bd, w in ((16, 128, 4), (32, 128, 4), (32, 256, 8), (64, 64, 4), (64, 128, 8))))


def default(meta: dict) -> Config:
    # 32 x 128 weight elements per step: 32 registers a thread at 4 warps, and V / 32 programs per sequence.
    return _config(32, min(128, max(16, triton.next_power_of_2(meta["D"]))), 4)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    D, V = meta["D"], meta["V"]
    num_v = triton.cdiv(V, config["BLOCK_V"])
    if num_v > 65535:
        raise ValueError(f"logits: V={V} needs {num_v} programs on grid axis 1 (max 65535); raise BLOCK_V")
    launch = make_launch(
        _logits_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "norm_w_ptr": ptr(dtypes["norm_w"]), "weight_ptr": ptr(dtypes["weight"]),
               "last_idx_ptr": ptr(dtypes["last_idx"]), "out_ptr": ptr(dtypes["out"]),
               "stride_x": "i64", "stride_out": "i64", "eps": "fp32"},
        constexprs={"D": D, "V": V, "BLOCK_V": config["BLOCK_V"], "BLOCK_D": config["BLOCK_D"]},
        args={"x_ptr": ("tensor", "x"), "norm_w_ptr": ("tensor", "norm_w"), "weight_ptr": ("tensor", "weight"),
              "last_idx_ptr": ("tensor", "last_idx"), "out_ptr": ("tensor", "out"),
              "stride_x": ("int", meta.get("stride_x", D)), "stride_out": ("int", meta.get("stride_out", V)),
              "eps": ("float", meta["eps"])},
        grid=[grid_dim(("R", 1, 1)), grid_dim(num_v)],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("logits", configs, default, plan)


def logits(x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, last_idx: torch.Tensor, *, eps: float,
           out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x [T, D], norm_w [D], weight [V, D], last_idx [S] i32 (each < T) -> out [S, V] fp32, via the kernel."""
    T, D = x.shape
    V = weight.shape[0]
    S = last_idx.shape[0]
    assert x.stride(1) == 1 and norm_w.shape == (D,) and weight.shape == (V, D) and weight.is_contiguous()
    assert last_idx.dtype == torch.int32 and last_idx.dim() == 1
    if out is None:
        out = torch.empty(S, V, dtype=torch.float32, device=x.device)
    assert out.shape == (S, V) and out.dtype == torch.float32 and out.stride(1) == 1
    meta = {"D": D, "V": V, "eps": eps, "stride_x": x.stride(0), "stride_out": out.stride(0), "max_T": T,
            "max_S": S}
    tensors = {"x": x, "norm_w": norm_w, "weight": weight, "last_idx": last_idx, "out": out}
    run(plan(meta, {k: dtype_name(t) for k, t in tensors.items()}, config or default(meta)), tensors,
        {"T": T, "S": S, "R": S})
    return out


def reference(x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, last_idx: torch.Tensor, *,
              eps: float) -> torch.Tensor:
    h = x[last_idx.long()].float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_w.float()
    return h @ weight.float().T
