"""Linear: out[T, N] = x[T, K] @ w[N, K]^T (+ bias[N]) (+ residual[T, N]), fp32 accumulation.

w is row-major [N, K] (the HF layout). The residual add is the epilogue of the o and down projections; out may
be the residual buffer itself, which is safe because each element is read and then written by one program.
Decode (small T) streams W once in a GEMV layout with optional split-K (reduced inside the same launch);
prefill uses tl.dot tiles. Both
layouts live in kernels/matmul_helpers.py (their configs in kernels/matmul_configs.py), shared with rms_norm_linear.

With act "rope" (the compiler's rope fusion, for a qkv projection with no norm to fold) w is the qkv weight with its
q and k rows paired for rotation, and out is qkv as kernels/rope.py leaves it: rotated by positions, and with
write_cache the k and v heads stored in the paged KV cache (kernels/rope_epilogue.py). No residual then.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.matmul_configs import (
    launch_config,
    matmul_configs,
    matmul_default,
    quant_meta,
    split_rows,
    split_scratch,
    tile_constexprs,
    tile_grid,
    token_count,
    weight_launch_pieces,
)
from kernels.matmul_helpers import matmul_program
from kernels.rope_epilogue import RopeEpilogue, rope_inputs, rope_launch_pieces
from kernels.rope_epilogue import reference as rope_epilogue_reference
from kernels.spec import SEMAPHORES, Config, KernelSpec, Plan, dtype_name, make_launch, ptr, run
from kernels.weight_quant import dequantize, is_int4


@triton.jit
def _linear_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K]; int8 with W_INT8; [N, K / 2] u8, two int4 per byte, with W_INT4
    scale_ptr,  # [N] fp32, w's scale per row (W_INT8); [N, K / GROUP_SIZE, 2] fp32 (scale, min) per group (W_INT4);
    # without either bound to w and never read
    bias_ptr,  # [N]; without HAS_BIAS bound to w and never read
    residual_ptr,  # [T, N]; without HAS_RESIDUAL bound to out and never read
    out_ptr,  # [T, N], may alias residual
    partial_ptr,  # [SPLIT_K, ROWS, N] fp32 scratch; with SPLIT_K == 1 bound to out and never written
    sem_ptr,  # [cdiv(N, BLOCK_N)] i32 scratch, zero between launches; with SPLIT_K == 1 bound to out, never used
    positions_ptr,  # [T] i32; without ACT_ROPE bound to out and never read
    cos_sin_ptr,  # [max_pos, ROT_DIM] fp32; without ACT_ROPE bound to out and never read
    slot_mapping_ptr,  # [T] i32; without WRITE_CACHE bound to out and never read
    k_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM]; without WRITE_CACHE bound to out and never written
    v_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM]; without WRITE_CACHE bound to out and never written
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
    W_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT_ROPE: tl.constexpr,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    USE_PDL: tl.constexpr,
    # Last and with defaults, so the format 3 indexes written before int4 (no such constexprs) still run interpreted.
    W_INT4: tl.constexpr = False,
    GROUP_SIZE: tl.constexpr = 0,
):
    matmul_program(x_ptr, w_ptr, scale_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr, partial_ptr, sem_ptr,
                   positions_ptr, cos_sin_ptr, slot_mapping_ptr, k_cache_ptr, v_cache_ptr, T, stride_x, stride_res,
                   stride_out, rows_cap, 0.0, N=N, K=K, K_SPAN=K_SPAN, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                   BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K, GROUP_M=GROUP_M, LOOP_M=LOOP_M, USE_DOT=USE_DOT, EVEN_K=EVEN_K,
                   W_INT8=W_INT8, USE_RMS=False, HAS_BIAS=HAS_BIAS, HAS_RESIDUAL=HAS_RESIDUAL, ACT_SILU_MUL=False,
                   ACT_ROPE=ACT_ROPE, HQ=HQ, HK=HK, HEAD_DIM=HEAD_DIM, ROT_DIM=ROT_DIM, IS_NEOX=IS_NEOX,
                   WRITE_CACHE=WRITE_CACHE, USE_PDL=USE_PDL, W_INT4=W_INT4, GROUP_SIZE=GROUP_SIZE, USE_NORM_W=False)


def configs(meta: dict) -> list[Config]:
    return matmul_configs(meta)


def default(meta: dict) -> Config:
    return matmul_default(meta)


def _check_act(meta: dict) -> None:
    act = meta.get("act")
    if act not in (None, "rope"):
        raise ValueError(f"linear: act {act!r} is not None or 'rope'")
    if act and meta["has_residual"]:
        raise ValueError("linear: act rope writes qkv, which takes no residual add")


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    _check_act(meta)
    N, K = meta["N"], meta["K"]
    has_bias, has_res = bool(meta["has_bias"]), bool(meta["has_residual"])
    split = config["SPLIT_K"] > 1
    # An absent optional input binds to a tensor the node always has; its HAS_* flag keeps it unread.
    bias = ("bias", dtypes["bias"]) if has_bias else ("w", dtypes["w"])
    res = ("residual", dtypes["residual"]) if has_res else ("out", dtypes["out"])
    partial = ("partial", "fp32") if split else ("out", dtypes["out"])
    sem = (SEMAPHORES, "i32") if split else ("out", dtypes["out"])
    rope_types, rope_args, rope_constexprs = rope_launch_pieces(meta, dtypes, config, unused="out")
    w_types, w_args, w_constexprs = weight_launch_pieces(meta, dtypes)
    t_types, t_args, t_constexprs = token_count(meta)
    launch = make_launch(
        _linear_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "w_ptr": ptr(dtypes["w"]), **w_types, "bias_ptr": ptr(bias[1]),
               "residual_ptr": ptr(res[1]), "out_ptr": ptr(dtypes["out"]), "partial_ptr": ptr(partial[1]),
               "sem_ptr": ptr(sem[1]), **rope_types, **t_types, "stride_x": "i64", "stride_res": "i64",
               "stride_out": "i64", "rows_cap": "i64"},
        constexprs={**tile_constexprs(meta, config), **w_constexprs, "HAS_BIAS": has_bias, "HAS_RESIDUAL": has_res,
                    **rope_constexprs, **t_constexprs,
                    "USE_PDL": False},
        args={"x_ptr": ("tensor", "x"), "w_ptr": ("tensor", "w"), **w_args, "bias_ptr": ("tensor", bias[0]),
              "residual_ptr": ("tensor", res[0]), "out_ptr": ("tensor", "out"),
              "partial_ptr": ("tensor", partial[0]), "sem_ptr": ("tensor", sem[0]), **rope_args, **t_args,
              "stride_x": ("int", meta.get("stride_x", K)), "stride_res": ("int", meta.get("stride_residual", N)),
              "stride_out": ("int", meta.get("stride_out", N)), "rows_cap": ("int", split_rows(meta))},
        grid=tile_grid(meta, config),
        config=launch_config(config, dtypes),
    )
    return Plan((launch,), scratch=split_scratch(meta, config, use_rms=False))


SPEC = KernelSpec("linear", configs, default, plan, tune_buckets=(1, 16, 64, 256))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           positions: torch.Tensor | None = None, cos_sin: torch.Tensor | None = None,
           slot_mapping: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
           v_cache: torch.Tensor | None = None, scale: torch.Tensor | None = None, *, act: str | None = None,
           num_q_heads: int = 0, num_kv_heads: int = 0, head_dim: int = 0, rotary_dim: int = 0, is_neox: bool = True,
           write_cache: bool = False, out: torch.Tensor | None = None, config: Config | None = None
           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K], w [N, K], bias [N] or None, residual [T, N] or None -> out [T, N] in x's dtype.

    out may be residual itself (the in-place residual add). Runs the kernel: interpreter on CPU tensors.
    act "rope": as rms_norm_linear's (qkv rotated, with write_cache the caches written and (out, k_cache, v_cache)
    returned), without a norm.
    """
    T, K = x.shape
    N = w.shape[0]
    w_cols = K // 2 if is_int4(w, scale) else K
    assert x.stride(1) == 1 and w.shape == (N, w_cols) and w.is_contiguous(), \
        "x [T, K] unit column stride, w [N, K] (int4: [N, K / 2])"
    assert bias is None or bias.shape == (N,)
    assert residual is None or (residual.shape == (T, N) and residual.stride(1) == 1)
    if out is None:
        out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    assert out.shape == (T, N) and out.stride(1) == 1
    meta = {"K": K, "N": N, "has_bias": bias is not None, "has_residual": residual is not None, "act": act,
            "stride_x": x.stride(0), "stride_out": out.stride(0), "max_T": T, "max_S": 1, "T_bucket": T}
    tensors = {"x": x, "w": w, "out": out}
    if scale is not None:
        meta |= quant_meta(w, scale, K)
        tensors["scale"] = scale
    for role, t in (("bias", bias), ("residual", residual)):
        if t is not None:
            tensors[role] = t
    if residual is not None:
        meta["stride_residual"] = residual.stride(0)
    rope = None
    if act == "rope":
        rope = RopeEpilogue(num_q_heads, num_kv_heads, head_dim, rotary_dim, is_neox, write_cache)
        meta |= rope.attrs()
        tensors |= rope_inputs(rope, T, positions, cos_sin, slot_mapping, k_cache, v_cache)
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return (out, k_cache, v_cache) if rope is not None and rope.write_cache else out


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
              residual: torch.Tensor | None = None, positions: torch.Tensor | None = None,
              cos_sin: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
              k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
              scale: torch.Tensor | None = None, *, act: str | None = None, num_q_heads: int = 0,
              num_kv_heads: int = 0, head_dim: int = 0, rotary_dim: int = 0, is_neox: bool = True,
              write_cache: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = x.float() @ dequantize(w, scale).T
    if bias is not None:
        out = out + bias.float()
    if residual is not None:
        out = out + residual.float()
    if act == "rope":
        rope = RopeEpilogue(num_q_heads, num_kv_heads, head_dim, rotary_dim, is_neox, write_cache)
        return rope_epilogue_reference(out, positions, cos_sin, slot_mapping, k_cache, v_cache, rope, x.dtype)
    if act is not None:
        raise ValueError(f"act {act!r} is not None or 'rope'")
    return out.to(x.dtype)
