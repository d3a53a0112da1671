"""Token embedding: out[t] = weight[ids[t]], one program per (token, BLOCK_D slice of the row).

Padding rows carry id 0 and so copy row 0, which is harmless. An id outside [0, V) (a tokenizer with more
tokens than the model's table, a bug upstream) gives a zero row instead of an out-of-bounds read: a wild read
would kill the whole GPU context, a zero row shows up as a wrong token that can be traced.

With USE_SCALE each row is multiplied by SCALE as it is read (Gemma: sqrt(hidden_size), already rounded to the
model dtype as HF rounds it), in fp32, then cast: HF's product of two model-dtype values, rounded once. The table
itself stays unscaled, as the lm_head tied to it needs.

A quantized table (attr quant, kernels/weight_quant.py, the schemes of the matmul weights with D as their K):
W_INT8, int8 rows with an fp32 scale per row (weight_scale [V]); W_INT4, rows of D / 2 bytes, two 4-bit q each,
with an fp32 (scale, min) per group of GROUP_SIZE along D (weight_scale [V, D / GROUP_SIZE, 2]). The row is
dequantized in fp32 as it is read (matmul_helpers.load_grouped for int4), then scaled and cast as above. int8_group
(neither flag, GROUP_SIZE > 0; a GGUF's Q8_0 / Q5_K / Q6_K table): int8 rows with int4's (scale, min) pairs, through
the same load_grouped. A table tied to the lm_head is quantized once and read by both kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.matmul_configs import quant_meta, weight_launch_pieces
from kernels.matmul_helpers import load_grouped
from kernels.pdl import enter
from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run
from kernels.weight_quant import dequantize, is_int4


@triton.jit
def _embedding_kernel(
    ids_ptr,  # [T] i32
    weight_ptr,  # [V, D]; int8 with W_INT8; [V, D / 2] u8, two int4 per byte, with W_INT4
    out_ptr,  # [T, D]
    T,
    stride_out,
    V: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_SCALE: tl.constexpr,
    SCALE: tl.constexpr,  # read only with USE_SCALE
    # Last and with defaults, so an index from before the quantized table binds and runs as it was.
    W_INT8: tl.constexpr = False,
    W_INT4: tl.constexpr = False,
    GROUP_SIZE: tl.constexpr = 0,
    weight_scale_ptr=None,  # [V] fp32 (W_INT8); [V, D / GROUP_SIZE, 2] fp32 (GROUP_SIZE > 0); else bound to weight
    USE_PDL: tl.constexpr = False,  # kernels/pdl.py; last with a default, so older indexes run interpreted
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    cols = d0 + tl.arange(0, BLOCK_D)
    token = tl.load(ids_ptr + row).to(tl.int64)
    valid = (token >= 0) & (token < V)
    safe = tl.where(valid, token, 0)
    mask = cols < D
    if GROUP_SIZE > 0:
        # One row of the table as a [1, BLOCK_D] tile of the grouped matmul layout, int4 or int8_group (row index V
        # for an invalid id: masked, zeros).
        tile = load_grouped(weight_ptr, weight_scale_ptr, tl.full((1,), 0, tl.int64) + tl.where(valid, token, V),
                            d0, N=V, K=D, BLOCK_N=1, BLOCK_K=BLOCK_D, EVEN_K=D % BLOCK_D == 0, GROUP_SIZE=GROUP_SIZE,
                            EVICT_FIRST=False, W_INT4=W_INT4)
        vals = tl.reshape(tile, (BLOCK_D,))
    else:
        vals = tl.load(weight_ptr + safe * D + cols, mask=mask & valid, other=0.0)
        if W_INT8:
            vals = vals.to(tl.float32) * tl.load(weight_scale_ptr + safe)
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
    w_types, w_args, w_constexprs = weight_launch_pieces(meta, dtypes, "weight", "weight_scale", "D",
                                                         "weight_scale_ptr")
    launch = make_launch(
        _embedding_kernel,
        types={"ids_ptr": ptr(dtypes["ids"]), "weight_ptr": ptr(dtypes["weight"]), "out_ptr": ptr(dtypes["out"]),
               "T": "i32", "stride_out": "i64", **w_types},
        constexprs={"V": V, "D": D, "BLOCK_D": block, **scale_constexprs(meta), **w_constexprs, "USE_PDL": False},
        args={"ids_ptr": ("tensor", "ids"), "weight_ptr": ("tensor", "weight"), "out_ptr": ("tensor", "out"),
              "T": ("sym", "T"), "stride_out": ("int", meta.get("stride_out", D)), **w_args},
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
              weight_scale: torch.Tensor | None = None, out_dtype: str | None = None,
              config: Config | None = None) -> torch.Tensor:
    """ids [T] i32, weight [V, D] -> out [T, D] = weight[ids] * scale in weight's dtype, through the kernel.

    weight_scale: a quantized table (int8 [V, D] with [V] fp32, or packed int4 [V, D / 2] with [V, D / G, 2] fp32),
    out then in out_dtype ("fp32", "fp16" or "bf16")."""
    (T,) = ids.shape
    V = weight.shape[0]
    D = weight.shape[1] * (2 if is_int4(weight, weight_scale) else 1)
    assert ids.dtype == torch.int32 and weight.is_contiguous(), "ids must be int32, weight a contiguous [V, D]"
    if out is None:
        dtype = weight.dtype if weight_scale is None else _OUT_DTYPES[out_dtype or "fp32"]
        out = torch.empty(T, D, dtype=dtype, device=weight.device)
    assert out.shape == (T, D) and out.stride(1) == 1
    meta = {"V": V, "D": D, "scale": scale, "stride_out": out.stride(0), "max_T": T, "max_S": 1}
    tensors = {"ids": ids, "weight": weight, "out": out}
    if weight_scale is not None:
        meta |= quant_meta(weight, weight_scale, D)
        tensors["weight_scale"] = weight_scale
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return out


_OUT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reference(ids: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None, scale: float = 1.0,
              out_dtype: str | None = None) -> torch.Tensor:
    """ids [T] i32, weight [V, D] -> [T, D]: the rows of weight the ids name (ids must lie in [0, V)), times scale
    (in fp32, rounded to weight's dtype). A quantized table (weight_scale, kernels/weight_quant.py) gives its rows
    dequantized, times scale, in out_dtype (the build dtype, node attr out_dtype)."""
    if weight_scale is not None:
        rows = dequantize(weight[ids.long()], weight_scale[ids.long()]) * scale
        return rows.to(_OUT_DTYPES[out_dtype or "fp32"])
    rows = weight[ids.long()]
    return rows if scale == 1.0 else (rows.float() * scale).to(weight.dtype)
