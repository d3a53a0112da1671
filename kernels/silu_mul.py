"""SwiGLU activation: out = silu(gate) * up, with gate and up side by side in one [T, 2I] row.

The gate_up linear writes gate in the first I columns of each row and up in the last I (docs/ops.md), so one
program reads a BLOCK_I slice of each half of one row. silu(g) = g * sigmoid(g), computed in fp32. The kernel
also serves GeGLU (kernels/gelu_tanh_mul.py) through the USE_GELU flag: one kernel, two activations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _glu_kernel(
    x_ptr,  # [T, 2 * I]: gate | up
    out_ptr,  # [T, I]
    T,
    stride_x,
    stride_out,
    I: tl.constexpr,
    BLOCK_I: tl.constexpr,
    USE_GELU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    if USE_GELU:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u), so gelu_tanh(g) = g / (1 + e^(-2u)): no tanh needed (Triton has no
        # portable one) and no overflow to NaN: for g -> -inf the denominator goes to inf and the result to -0.
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate / (1.0 + tl.exp(-2.0 * u))
    else:
        # g / (1 + e^-g): for g -> -inf the denominator goes to inf and the result to -0, never NaN.
        act = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _block(I: int) -> int:
    return min(triton.next_power_of_2(I), 1024)


def configs(meta: dict) -> list[Config]:
    top = triton.next_power_of_2(meta["I"])
    return [Config.make(num_warps=w, num_stages=1, BLOCK_I=b)
            for b, w in ((256, 1), (512, 2), (1024, 4), (2048, 8)) if b <= max(top, 256)]


def default(meta: dict) -> Config:
    block = _block(meta["I"])
    return Config.make(num_warps=max(1, min(4, block // 256)), num_stages=1, BLOCK_I=block)


def plan(meta: dict, dtypes: dict, config: Config, use_gelu: bool = False) -> Plan:
    I = meta["I"]
    block = config["BLOCK_I"]
    launch = make_launch(
        _glu_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "out_ptr": ptr(dtypes["out"]),
               "T": "i32", "stride_x": "i64", "stride_out": "i64"},
        constexprs={"I": I, "BLOCK_I": block, "USE_GELU": use_gelu},
        args={"x_ptr": ("tensor", "x"), "out_ptr": ("tensor", "out"), "T": ("sym", "T"),
              "stride_x": ("int", meta.get("stride_x", 2 * I)), "stride_out": ("int", meta.get("stride_out", I))},
        grid=[grid_dim(("T", 1, 1)), grid_dim(-(-I // block))],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("silu_mul", configs, default, plan)


def silu_mul(x: torch.Tensor, out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x [T, 2I] (gate | up) -> out [T, I] = silu(gate) * up in x's dtype, through the kernel."""
    return glu(x, out, config, plan)


def glu(x: torch.Tensor, out: torch.Tensor | None, config: Config | None, plan_fn) -> torch.Tensor:
    """Run a gated activation's plan on x [T, 2I] (gate | up) into out [T, I]."""
    T, two_i = x.shape
    assert two_i % 2 == 0 and x.stride(1) == 1, "x must be [T, 2I] with unit column stride"
    I = two_i // 2
    if out is None:
        out = torch.empty(T, I, dtype=x.dtype, device=x.device)
    assert out.shape == (T, I) and out.stride(1) == 1
    meta = {"I": I, "stride_x": x.stride(0), "stride_out": out.stride(0), "max_T": T, "max_S": 1}
    dtypes = {"x": dtype_name(x), "out": dtype_name(out)}
    run(plan_fn(meta, dtypes, config or default(meta)), {"x": x, "out": out}, {"T": T, "S": 1})
    return out


def reference(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> [T, I]: silu(x[:, :I]) * x[:, I:], in fp32, cast to x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)
