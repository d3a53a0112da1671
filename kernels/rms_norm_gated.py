"""Mamba2 gated RMSNorm with groups: out = group_rms_norm(x * silu(z)) * w.

The Mamba2 mixer gates its SSM output with silu(z) and then normalises each of n_groups contiguous groups of
D / n_groups channels on its own (seeds/004: groups stay whole so each can be normalised independently; with
n_groups = 1 it is a plain RMSNorm of the gated row). One program per (row, group); everything in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _rms_norm_gated_kernel(
    x_ptr,  # [T, D]
    z_ptr,  # [T, D]
    w_ptr,  # [D]
    out_ptr,  # [T, D]
    T,
    stride_x,
    stride_z,
    stride_out,
    eps,
    GROUP: tl.constexpr,  # D / n_groups
    BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * GROUP + tl.arange(0, BLOCK_G)
    mask = tl.arange(0, BLOCK_G) < GROUP
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
    # silu(z) = z / (1 + e^-z); masked lanes have x = 0 and add nothing to the sum of squares.
    h = x * (z / (1.0 + tl.exp(-z)))
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / GROUP + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _group(meta: dict) -> int:
    D, n_groups = meta["D"], meta["n_groups"]
    if n_groups < 1 or D % n_groups:
        raise ValueError(f"rms_norm_gated: D={D} is not divisible into n_groups={n_groups} groups")
    return D // n_groups


def _warps(block: int) -> int:
    return 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 4096 else 8


def configs(meta: dict) -> list[Config]:
    block = triton.next_power_of_2(_group(meta))
    return [Config.make(num_warps=w, num_stages=1) for w in (1, 2, 4, 8, 16) if w * 32 <= max(block, 32)]


def default(meta: dict) -> Config:
    return Config.make(num_warps=_warps(triton.next_power_of_2(_group(meta))), num_stages=1)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    D, group = meta["D"], _group(meta)
    launch = make_launch(
        _rms_norm_gated_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "z_ptr": ptr(dtypes["z"]), "w_ptr": ptr(dtypes["w"]),
               "out_ptr": ptr(dtypes["out"]), "T": "i32", "stride_x": "i64", "stride_z": "i64",
               "stride_out": "i64", "eps": "fp32"},
        constexprs={"GROUP": group, "BLOCK_G": triton.next_power_of_2(group)},
        args={"x_ptr": ("tensor", "x"), "z_ptr": ("tensor", "z"), "w_ptr": ("tensor", "w"),
              "out_ptr": ("tensor", "out"), "T": ("sym", "T"),
              **{f"stride_{r}": ("int", meta.get(f"stride_{r}", D)) for r in ("x", "z", "out")},
              "eps": ("float", meta["eps"])},
        grid=[grid_dim(("T", 1, 1)), grid_dim(meta["n_groups"])],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("rms_norm_gated", configs, default, plan)


def rms_norm_gated(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float, n_groups: int,
                   out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x, z [T, D], w [D] -> out [T, D] = group_rms_norm(x * silu(z)) * w in x's dtype, through the kernel."""
    T, D = x.shape
    assert z.shape == (T, D) and w.shape == (D,), "x and z must be [T, D], w [D]"
    out = torch.empty_like(x) if out is None else out
    tensors = {"x": x, "z": z, "w": w, "out": out}
    assert all(t.stride(-1) == 1 for t in tensors.values()), "tensors need unit column stride"
    meta = {"D": D, "eps": eps, "n_groups": n_groups, "max_T": T, "max_S": 1,
            **{f"stride_{r}": tensors[r].stride(0) for r in ("x", "z", "out")}}
    dtypes = {r: dtype_name(t) for r, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return out


def reference(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, *, eps: float, n_groups: int) -> torch.Tensor:
    """x, z [T, D], w [D] -> [T, D]: h = x * silu(z), each group of D / n_groups channels RMS-normalised, times w."""
    T, D = x.shape
    h = (x.float() * torch.nn.functional.silu(z.float())).reshape(T, n_groups, D // n_groups)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.reshape(T, D) * w.float()).to(x.dtype)
