"""Fused residual add + RMSNorm: residual_out = x + residual, out = residual_out / rms(residual_out) * w.

One program per row. The sum is rounded to the residual dtype before the norm reads it, as an unfused
model does (HF: hidden = residual + hidden in the activation dtype, then the norm upcasts): the value that is
normalised is exactly the value carried to the next layer. residual_out may alias residual; each element is
read before its program writes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import enter
from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,  # [T, D]
    residual_ptr,  # [T, D]
    w_ptr,  # [D]
    out_ptr,  # [T, D]
    residual_out_ptr,  # [T, D], may be residual_ptr
    T,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # kernels/pdl.py; last with a default, so older indexes run interpreted
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + row * stride_residual_out + cols, s, mask=mask)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (s * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    return 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 4096 else 8


def configs(meta: dict) -> list[Config]:
    block = triton.next_power_of_2(meta["D"])
    return [Config.make(num_warps=w, num_stages=1) for w in (1, 2, 4, 8, 16) if w * 32 <= max(block, 32)]


def default(meta: dict) -> Config:
    return Config.make(num_warps=_warps(triton.next_power_of_2(meta["D"])), num_stages=1)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    D = meta["D"]
    roles = ("x", "residual", "w", "out", "residual_out")
    launch = make_launch(
        _add_rms_norm_kernel,
        types={**{f"{r}_ptr": ptr(dtypes[r]) for r in roles}, "T": "i32", "stride_x": "i64",
               "stride_residual": "i64", "stride_out": "i64", "stride_residual_out": "i64", "eps": "fp32"},
        constexprs={"D": D, "BLOCK_D": triton.next_power_of_2(D), "USE_PDL": False},
        args={**{f"{r}_ptr": ("tensor", r) for r in roles}, "T": ("sym", "T"),
              **{f"stride_{r}": ("int", meta.get(f"stride_{r}", D)) for r in ("x", "residual", "out", "residual_out")},
              "eps": ("float", meta["eps"])},
        grid=[grid_dim(("T", 1, 1))],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("add_rms_norm", configs, default, plan)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                 config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, D], w [D] -> (out [T, D], residual_out [T, D]) through the kernel.

    Pass ``residual_out=residual`` to update the residual stream in place, as the runtime does.
    """
    T, D = x.shape
    assert residual.shape == (T, D) and w.shape == (D,), "x and residual must be [T, D], w [D]"
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(residual) if residual_out is None else residual_out
    tensors = {"x": x, "residual": residual, "w": w, "out": out, "residual_out": residual_out}
    assert all(t.stride(-1) == 1 for t in tensors.values()), "tensors need unit column stride"
    meta = {"D": D, "eps": eps, "max_T": T, "max_S": 1,
            **{f"stride_{r}": tensors[r].stride(0) for r in ("x", "residual", "out", "residual_out")}}
    dtypes = {r: dtype_name(t) for r, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return out, residual_out


def reference(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, *,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, D], w [D] -> (norm(x + residual) * w, x + residual); the sum rounded to residual's dtype."""
    s = (x.float() + residual.float()).to(residual.dtype)
    sf = s.float()
    out = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    return out.to(x.dtype), s
