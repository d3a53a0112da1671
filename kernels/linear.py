"""Linear: out[T, N] = x[T, K] @ w[N, K]^T (+ bias[N]) (+ residual[T, N]), fp32 accumulation.

w is row-major [N, K] (the HF layout). The residual add is the epilogue of the o and down projections; out may
be the residual buffer itself, which is safe because each element is read and then written by one program.
Decode (small T) streams W once in a GEMV layout with optional split-K (reduced inside the same launch);
prefill uses tl.dot tiles. Both
layouts live in kernels/matmul_helpers.py (their configs in kernels/matmul_configs.py), shared with rms_norm_linear.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.matmul_configs import (
    launch_config,
    matmul_configs,
    matmul_default,
    split_rows,
    split_scratch,
    tile_constexprs,
    tile_grid,
)
from kernels.matmul_helpers import matmul_program
from kernels.spec import SEMAPHORES, Config, KernelSpec, Plan, dtype_name, make_launch, ptr, run


@triton.jit
def _linear_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N]; without HAS_BIAS bound to w and never read
    residual_ptr,  # [T, N]; without HAS_RESIDUAL bound to out and never read
    out_ptr,  # [T, N], may alias residual
    partial_ptr,  # [SPLIT_K, ROWS, N] fp32 scratch; with SPLIT_K == 1 bound to out and never written
    sem_ptr,  # [cdiv(N, BLOCK_N)] i32 scratch, zero between launches; with SPLIT_K == 1 bound to out, never used
    T,
    stride_x,
    stride_res,
    stride_out,
    rows_cap,  # ROWS, the rows the partials hold
    N: tl.constexpr,
    K: tl.constexpr,
    K_SPAN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LOOP_M: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    matmul_program(x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr, partial_ptr, sem_ptr, T, stride_x,
                   stride_res, stride_out, rows_cap, 0.0, N=N, K=K, K_SPAN=K_SPAN, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                   BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K, GROUP_M=GROUP_M, LOOP_M=LOOP_M, USE_DOT=USE_DOT, EVEN_K=EVEN_K,
                   USE_RMS=False, HAS_BIAS=HAS_BIAS, HAS_RESIDUAL=HAS_RESIDUAL, ACT_SILU_MUL=False, USE_PDL=USE_PDL)


def configs(meta: dict) -> list[Config]:
    return matmul_configs(meta)


def default(meta: dict) -> Config:
    return matmul_default(meta)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    N, K = meta["N"], meta["K"]
    has_bias, has_res = bool(meta["has_bias"]), bool(meta["has_residual"])
    split = config["SPLIT_K"] > 1
    # An absent optional input binds to a tensor the node always has; its HAS_* flag keeps it unread.
    bias = ("bias", dtypes["bias"]) if has_bias else ("w", dtypes["w"])
    res = ("residual", dtypes["residual"]) if has_res else ("out", dtypes["out"])
    partial = ("partial", "fp32") if split else ("out", dtypes["out"])
    sem = (SEMAPHORES, "i32") if split else ("out", dtypes["out"])
    launch = make_launch(
        _linear_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "w_ptr": ptr(dtypes["w"]), "bias_ptr": ptr(bias[1]),
               "residual_ptr": ptr(res[1]), "out_ptr": ptr(dtypes["out"]), "partial_ptr": ptr(partial[1]),
               "sem_ptr": ptr(sem[1]), "T": "i32", "stride_x": "i64", "stride_res": "i64", "stride_out": "i64",
               "rows_cap": "i64"},
        constexprs={**tile_constexprs(meta, config), "HAS_BIAS": has_bias, "HAS_RESIDUAL": has_res,
                    "USE_PDL": False},
        args={"x_ptr": ("tensor", "x"), "w_ptr": ("tensor", "w"), "bias_ptr": ("tensor", bias[0]),
              "residual_ptr": ("tensor", res[0]), "out_ptr": ("tensor", "out"),
              "partial_ptr": ("tensor", partial[0]), "sem_ptr": ("tensor", sem[0]), "T": ("sym", "T"),
              "stride_x": ("int", meta.get("stride_x", K)), "stride_res": ("int", meta.get("stride_residual", N)),
              "stride_out": ("int", meta.get("stride_out", N)), "rows_cap": ("int", split_rows(meta))},
        grid=tile_grid(meta, config),
        config=launch_config(config, dtypes),
    )
    return Plan((launch,), scratch=split_scratch(meta, config, use_rms=False))


SPEC = KernelSpec("linear", configs, default, plan, tune_buckets=(1, 16, 64, 256))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x [T, K], w [N, K], bias [N] or None, residual [T, N] or None -> out [T, N] in x's dtype.

    out may be residual itself (the in-place residual add). Runs the kernel: interpreter on CPU tensors.
    """
    T, K = x.shape
    N = w.shape[0]
    assert x.stride(1) == 1 and w.shape == (N, K) and w.is_contiguous(), "x [T, K] unit column stride, w [N, K]"
    assert bias is None or bias.shape == (N,)
    assert residual is None or (residual.shape == (T, N) and residual.stride(1) == 1)
    if out is None:
        out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    assert out.shape == (T, N) and out.stride(1) == 1
    meta = {"K": K, "N": N, "has_bias": bias is not None, "has_residual": residual is not None,
            "stride_x": x.stride(0), "stride_out": out.stride(0), "max_T": T, "max_S": 1, "T_bucket": T}
    tensors = {"x": x, "w": w, "out": out}
    dtypes = {"x": dtype_name(x), "w": dtype_name(w), "out": dtype_name(out)}
    for role, t in (("bias", bias), ("residual", residual)):
        if t is not None:
            tensors[role], dtypes[role] = t, dtype_name(t)
    if residual is not None:
        meta["stride_residual"] = residual.stride(0)
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return out


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ w.float().T
    if bias is not None:
        out = out + bias.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype)
