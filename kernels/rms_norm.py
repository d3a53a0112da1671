"""RMSNorm: out = x / sqrt(mean(x^2) + eps) * w, one program per row, statistics in fp32.

With HAS_RESIDUAL the norm takes the residual add after it as its epilogue: out = residual + norm(x) * w, the
sandwich norm of Gemma 2/3 (out = x + post_norm(o_proj(...)), where the add follows a norm, not a linear). The
normed value is rounded to the output dtype before the add, as HF's norm returns it in the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import enter
from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, D]
    w_ptr,  # [D]
    residual_ptr,  # [T, D]; without HAS_RESIDUAL bound to x and never read
    out_ptr,  # [T, D]
    T,
    stride_x,
    stride_res,
    stride_out,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # kernels/pdl.py; last with a default, so older indexes run interpreted
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x * rstd * w).to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + r).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)


def _warps(block: int) -> int:
    return 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 4096 else 8


def configs(meta: dict) -> list[Config]:
    block = triton.next_power_of_2(meta["D"])
    return [Config.make(num_warps=w, num_stages=1) for w in (1, 2, 4, 8) if w * 32 <= max(block, 32)]


def default(meta: dict) -> Config:
    return Config.make(num_warps=_warps(triton.next_power_of_2(meta["D"])), num_stages=1)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    D = meta["D"]
    has_residual = bool(meta.get("has_residual", False))
    residual = "residual" if has_residual else "x"
    launch = make_launch(
        _rms_norm_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "w_ptr": ptr(dtypes["w"]), "residual_ptr": ptr(dtypes[residual]),
               "out_ptr": ptr(dtypes["out"]), "T": "i32", "stride_x": "i64", "stride_res": "i64",
               "stride_out": "i64", "eps": "fp32"},
        constexprs={"D": D, "BLOCK_D": triton.next_power_of_2(D), "HAS_RESIDUAL": has_residual, "USE_PDL": False},
        args={"x_ptr": ("tensor", "x"), "w_ptr": ("tensor", "w"), "residual_ptr": ("tensor", residual),
              "out_ptr": ("tensor", "out"), "T": ("sym", "T"), "stride_x": ("int", meta.get("stride_x", D)),
              "stride_res": ("int", meta.get("stride_res", D)), "stride_out": ("int", meta.get("stride_out", D)),
              "eps": ("float", meta["eps"])},
        grid=[grid_dim(("T", 1, 1))],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("rms_norm", configs, default, plan)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x [T, D], w [D] (, residual [T, D]) -> [T, D] in x's dtype (+ residual), through the kernel (interpreter on
    CPU tensors)."""
    T, D = x.shape
    assert x.stride(1) == 1 and w.shape == (D,), "x must be [T, D] with unit column stride, w [D]"
    assert residual is None or (residual.shape == x.shape and residual.stride(1) == 1)
    out = torch.empty_like(x) if out is None else out
    assert out.shape == x.shape and out.stride(1) == 1
    tensors = {"x": x, "w": w, "out": out, **({"residual": residual} if residual is not None else {})}
    meta = {"D": D, "eps": eps, "has_residual": residual is not None, "stride_x": x.stride(0),
            "stride_res": residual.stride(0) if residual is not None else D, "stride_out": out.stride(0),
            "max_T": T, "max_S": 1}
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return out


def reference(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
              has_residual: bool = False) -> torch.Tensor:
    """x / rms(x) * w in fp32, in x's dtype; with a residual, that rounded value + residual, rounded again."""
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)
    return out if residual is None else (out.float() + residual.float()).to(x.dtype)
