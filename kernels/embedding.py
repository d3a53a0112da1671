"""Token embedding: out[t] = weight[ids[t]], one program per (token, BLOCK_D slice of the row).

Padding rows carry id 0 and so copy row 0, which is harmless. An id outside [0, V) (a tokenizer with more
tokens than the model's table, a bug upstream) gives a zero row instead of an out-of-bounds read: a wild read
would kill the whole GPU context, a zero row shows up as a wrong token that can be traced.

With USE_SCALE each row is multiplied by SCALE as it is read (Gemma: sqrt(hidden_size), already rounded to the
model dtype as HF rounds it), in fp32, then cast: HF's product of two model-dtype values, rounded once. The table
itself stays unscaled, as the lm_head tied to it needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import enter
from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _embedding_kernel(
    ids_ptr,  # [T] i32
    weight_ptr,  # [V, D]
    out_ptr,  # [T, D]
    T,
    stride_out,
    V: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_SCALE: tl.constexpr,
    SCALE: tl.constexpr,  # read only with USE_SCALE
    USE_PDL: tl.constexpr = False,  # kernels/pdl.py; last with a default, so older indexes run interpreted
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token = tl.load(ids_ptr + row).to(tl.int64)
    valid = (token >= 0) & (token < V)
    safe = tl.where(valid, token, 0)
    mask = cols < D
    vals = tl.load(weight_ptr + safe * D + cols, mask=mask & valid, other=0.0)
    if USE_SCALE:
        vals = vals.to(tl.float32) * SCALE
    tl.store(out_ptr + row * stride_out + cols, vals.to(out_ptr.dtype.element_ty), mask=mask)


def _block(D: int) -> int:
    return min(triton.next_power_of_2(D), 1024)


def configs(meta: dict) -> list[Config]:
    top = triton.next_power_of_2(meta["D"])
    return [Config.make(num_warps=w, num_stages=1, BLOCK_D=b)
            for b, w in ((256, 1), (512, 2), (1024, 4), (2048, 8)) if b <= max(top, 256)]


def default(meta: dict) -> Config:
    block = _block(meta["D"])
    return Config.make(num_warps=max(1, min(4, block // 256)), num_stages=1, BLOCK_D=block)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    V, D = meta["V"], meta["D"]
    block = config["BLOCK_D"]
    launch = make_launch(
        _embedding_kernel,
        types={"ids_ptr": ptr(dtypes["ids"]), "weight_ptr": ptr(dtypes["weight"]), "out_ptr": ptr(dtypes["out"]),
               "T": "i32", "stride_out": "i64"},
        constexprs={"V": V, "D": D, "BLOCK_D": block, **scale_constexprs(meta), "USE_PDL": False},
        args={"ids_ptr": ("tensor", "ids"), "weight_ptr": ("tensor", "weight"), "out_ptr": ("tensor", "out"),
              "T": ("sym", "T"), "stride_out": ("int", meta.get("stride_out", D))},
        grid=[grid_dim(("T", 1, 1)), grid_dim(-(-D // block))],
        config=config,
    )
    return Plan((launch,))


def scale_constexprs(meta: dict) -> dict:
    """USE_SCALE / SCALE from the node's ``scale`` attr; without one (every family but Gemma) the kernel is the
    plain gather it always was."""
    scale = float(meta.get("scale", 1.0))
    return {"USE_SCALE": scale != 1.0, "SCALE": scale if scale != 1.0 else 0.0}


SPEC = KernelSpec("embedding", configs, default, plan)


def embedding(ids: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, *, scale: float = 1.0,
              config: Config | None = None) -> torch.Tensor:
    """ids [T] i32, weight [V, D] -> out [T, D] = weight[ids] * scale in weight's dtype, through the kernel."""
    (T,) = ids.shape
    V, D = weight.shape
    assert ids.dtype == torch.int32 and weight.is_contiguous(), "ids must be int32, weight a contiguous [V, D]"
    if out is None:
        out = torch.empty(T, D, dtype=weight.dtype, device=weight.device)
    assert out.shape == (T, D) and out.stride(1) == 1
    meta = {"V": V, "D": D, "scale": scale, "stride_out": out.stride(0), "max_T": T, "max_S": 1}
    dtypes = {"ids": dtype_name(ids), "weight": dtype_name(weight), "out": dtype_name(out)}
    run(plan(meta, dtypes, config or default(meta)), {"ids": ids, "weight": weight, "out": out}, {"T": T, "S": 1})
    return out


def reference(ids: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """ids [T] i32, weight [V, D] -> [T, D]: the rows of weight the ids name (ids must lie in [0, V)), times scale
    (in fp32, rounded to weight's dtype)."""
    rows = weight[ids.long()]
    return rows if scale == 1.0 else (rows.float() * scale).to(weight.dtype)
