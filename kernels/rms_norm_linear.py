"""RMSNorm fused into the following linear: out[T, N] = rstd(x) * (x[T, K] @ w[N, K]^T) (+ bias[N]).

The compiler has folded the norm weight g into w (W' = W * diag(g), in fp32, then cast), so what is left of the
norm is a per-row scalar. A quantized w keeps its own grid instead (USE_NORM_W, input norm_w [K]): the kernel
multiplies each x tile by g, out = rstd(x) * ((x * g) @ w^T), the sum of squares still over the raw x. Either way
rstd(x) = 1 / sqrt(mean(x^2) + eps) commutes with the product and is applied in the epilogue ("FlashNorm", arXiv
2407.09577). Its sum of squares comes from a short pass over the row of x (tiny next to W and cache-resident), so no
[T, K] normed activation is ever written. Layouts (GEMV / split-K for decode, tl.dot tiles for prefill) are those
of kernels/matmul_helpers.py.

With act "silu_mul" (the compiler's SwiGLU fusion) w is the gate_up weight with its rows interleaved, row 2j =
gate_j and row 2j + 1 = up_j, and out[T, N / 2] = silu(gate) * up: silu_mul runs in the epilogue. act
"gelu_tanh_mul" (GeGLU, Gemma) is the same with gelu_tanh(gate).

With act "rope" (the compiler's rope fusion) w is the qkv weight with its q and k rows paired for rotation, and out
is qkv [T, N] as kernels/rope.py leaves it: rotated by positions, and with write_cache the k and v heads stored in
the paged KV cache (kernels/rope_epilogue.py).
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
from kernels.matmul_helpers import ACT_GELU_TANH, matmul_program
from kernels.pdl import enter
from kernels.rope_epilogue import RopeEpilogue, rope_inputs, rope_launch_pieces
from kernels.rope_epilogue import reference as rope_epilogue_reference
from kernels.spec import SEMAPHORES, Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run
from kernels.weight_quant import dequantize, is_int4


@triton.jit
def _rms_norm_linear_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [N, K], norm weight folded in unless USE_NORM_W; int8 with W_INT8; [N, K / 2] u8 (two int4) with W_INT4
    scale_ptr,  # [N] fp32, w's scale per row (W_INT8); [N, K / GROUP_SIZE, 2] fp32 (scale, min) per group (W_INT4);
    # without either bound to w and never read
    bias_ptr,  # [N]; without HAS_BIAS bound to w and never read
    out_ptr,  # [T, N]; [T, N / 2] with ACT_SILU_MUL
    partial_ptr,  # [SPLIT_K, ROWS, N] fp32 scratch; with SPLIT_K == 1 bound to out and never written
    sumsq_ptr,  # [cdiv(N, BLOCK_N), SPLIT_K, ROWS] fp32 scratch; with SPLIT_K == 1 bound to out and never written
    sem_ptr,  # [cdiv(N, BLOCK_N)] i32 scratch, zero between launches; with SPLIT_K == 1 bound to out, never used
    positions_ptr,  # [T] i32; without ACT_ROPE bound to out and never read
    cos_sin_ptr,  # [max_pos, ROT_DIM] fp32; without ACT_ROPE bound to out and never read
    slot_mapping_ptr,  # [T] i32; without WRITE_CACHE bound to out and never read
    k_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM]; without WRITE_CACHE bound to out and never written
    v_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM]; without WRITE_CACHE bound to out and never written
    T,
    stride_x,
    stride_out,
    rows_cap,  # ROWS, the rows the partials hold
    eps,
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
    ACT_SILU_MUL: tl.constexpr,
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
    # Last and with defaults for the same reason (an index from before USE_NORM_W binds no norm_w_ptr).
    USE_NORM_W: tl.constexpr = False,
    norm_w_ptr=None,  # [K], the norm weight applied to x (USE_NORM_W); without it bound to w and never read
    RMS_PREPASS: tl.constexpr = False,
    row_sumsq_ptr=None,  # [ROWS] fp32, written by _row_sumsq_kernel (RMS_PREPASS); without it bound to out, unread
):
    matmul_program(x_ptr, w_ptr, scale_ptr, norm_w_ptr, bias_ptr, out_ptr, out_ptr, partial_ptr, sumsq_ptr, sem_ptr,
                   positions_ptr, cos_sin_ptr, slot_mapping_ptr, k_cache_ptr, v_cache_ptr, T, stride_x, stride_out,
                   stride_out, rows_cap, eps, N=N, K=K, K_SPAN=K_SPAN, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                   BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K, GROUP_M=GROUP_M, LOOP_M=LOOP_M, USE_DOT=USE_DOT, EVEN_K=EVEN_K,
                   W_INT8=W_INT8, USE_RMS=True, HAS_BIAS=HAS_BIAS, HAS_RESIDUAL=False, ACT_SILU_MUL=ACT_SILU_MUL,
                   ACT_ROPE=ACT_ROPE, HQ=HQ, HK=HK, HEAD_DIM=HEAD_DIM, ROT_DIM=ROT_DIM, IS_NEOX=IS_NEOX,
                   WRITE_CACHE=WRITE_CACHE, USE_PDL=USE_PDL, W_INT4=W_INT4, GROUP_SIZE=GROUP_SIZE,
                   USE_NORM_W=USE_NORM_W, RMS_PREPASS=RMS_PREPASS, row_sumsq_ptr=row_sumsq_ptr)


@triton.jit
def _row_sumsq_kernel(
    x_ptr,  # [T, K]
    row_sumsq_ptr,  # [ROWS] fp32 out: sum of x^2 per row
    T,
    stride_x,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """The pre-pass of a many-row rms_norm_linear: each row's sum of squares, once, for every tile of the matmul
    to read (kernels/matmul_helpers.py, RMS_PREPASS)."""
    enter(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_R, BLOCK_K), 0.0, tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=(rows < T)[:, None] & (ks < K)[None, :],
                    other=0.0).to(tl.float32)
        acc += x * x
    tl.store(row_sumsq_ptr + rows, tl.sum(acc, axis=1), mask=rows < T)


# Rows of a step from which the matmul's tiles (GEMM layout, or the tl.dot layout of 128-row and larger blocks) take
# each row's sum of squares from a pre-pass launch instead of a pass of their own over their x rows: every tile
# re-read its BLOCK_M x K slice of x, latency-bound, ahead of its product. On an H200 that made Llama-3-8B's gate_up
# at 2,048 rows 1.9x slower than cuBLAS while the same tiles without the norm ran at 0.9x (benchmarks/gemv.py).
PREPASS_MIN_ROWS = 128
_PREPASS_ROWS, _PREPASS_K = 4, 1024


def uses_prepass(config: Config) -> bool:
    return not config["LOOP_M"] or (config["USE_DOT"] and config["BLOCK_M"] >= PREPASS_MIN_ROWS)


def configs(meta: dict) -> list[Config]:
    return matmul_configs(meta)


def default(meta: dict) -> Config:
    return matmul_default(meta)


_ACTS = {None: False, "silu_mul": True, "gelu_tanh_mul": ACT_GELU_TANH.value, "rope": False}


def _act(meta: dict) -> bool | int:
    """ACT_SILU_MUL for attr act: absent or None off (False), "silu_mul" SwiGLU (True), "gelu_tanh_mul" GeGLU; "rope"
    leaves it off (the rope epilogue has its own ACT_ROPE)."""
    act = meta.get("act")
    if act not in _ACTS:
        raise ValueError(f"rms_norm_linear: act {act!r} is not None, 'silu_mul', 'gelu_tanh_mul' or 'rope'")
    if act in ("silu_mul", "gelu_tanh_mul") and meta["N"] % 2:
        raise ValueError(f"rms_norm_linear: act {act} needs an even N (interleaved gate/up rows), got {meta['N']}")
    return _ACTS[act]


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    N, K = meta["N"], meta["K"]
    has_bias, act = bool(meta["has_bias"]), _act(meta)
    split = config["SPLIT_K"] > 1
    # An absent optional input binds to a tensor the node always has; its HAS_* / ACT_* flag keeps it unread.
    bias = ("bias", dtypes["bias"]) if has_bias else ("w", dtypes["w"])
    out = ("out", dtypes["out"])
    partial, sumsq, sem = (("partial", "fp32"), ("sumsq", "fp32"), (SEMAPHORES, "i32")) if split else (out,) * 3
    rope_types, rope_args, rope_constexprs = rope_launch_pieces(meta, dtypes, config, unused="out")
    w_types, w_args, w_constexprs = weight_launch_pieces(meta, dtypes)
    t_types, t_args, t_constexprs = token_count(meta)
    use_norm_w = bool(meta.get("use_norm_w"))
    norm_w = ("norm_w", dtypes["norm_w"]) if use_norm_w else ("w", dtypes["w"])
    prepass = uses_prepass(config)
    row_sumsq = ("row_sumsq", "fp32") if prepass else out
    if prepass:  # the split-K partial sums of squares are not needed either
        sumsq = out
    launch = make_launch(
        _rms_norm_linear_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "w_ptr": ptr(dtypes["w"]), **w_types, "bias_ptr": ptr(bias[1]),
               "out_ptr": ptr(dtypes["out"]), "partial_ptr": ptr(partial[1]), "sumsq_ptr": ptr(sumsq[1]),
               "sem_ptr": ptr(sem[1]), **rope_types, **t_types, "stride_x": "i64", "stride_out": "i64",
               "rows_cap": "i64", "eps": "fp32", "norm_w_ptr": ptr(norm_w[1]), "row_sumsq_ptr": ptr(row_sumsq[1])},
        constexprs={**tile_constexprs(meta, config), **w_constexprs, "HAS_BIAS": has_bias, "ACT_SILU_MUL": act,
                    **rope_constexprs, **t_constexprs, "USE_PDL": False, "USE_NORM_W": use_norm_w,
                    "RMS_PREPASS": prepass},
        args={"x_ptr": ("tensor", "x"), "w_ptr": ("tensor", "w"), **w_args, "bias_ptr": ("tensor", bias[0]),
              "out_ptr": ("tensor", "out"), "partial_ptr": ("tensor", partial[0]), "sumsq_ptr": ("tensor", sumsq[0]),
              "sem_ptr": ("tensor", sem[0]), **rope_args, **t_args,
              "stride_x": ("int", meta.get("stride_x", K)),
              "stride_out": ("int", meta.get("stride_out", N // 2 if act else N)),
              "rows_cap": ("int", split_rows(meta)), "eps": ("float", meta["eps"]),
              "norm_w_ptr": ("tensor", norm_w[0]), "row_sumsq_ptr": ("tensor", row_sumsq[0])},
        grid=tile_grid(meta, config),
        config=launch_config(config, dtypes),
    )
    scratch = split_scratch(meta, config, use_rms=not prepass)
    if not prepass:
        return Plan((launch,), scratch=scratch)
    sums = make_launch(
        _row_sumsq_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "row_sumsq_ptr": ptr("fp32"), "T": "i32", "stride_x": "i64"},
        constexprs={"K": K, "BLOCK_R": _PREPASS_ROWS, "BLOCK_K": min(_PREPASS_K, triton.next_power_of_2(K)),
                    "USE_PDL": False},
        args={"x_ptr": ("tensor", "x"), "row_sumsq_ptr": ("tensor", "row_sumsq"), "T": ("sym", "T"),
              "stride_x": ("int", meta.get("stride_x", K))},
        grid=[grid_dim(("T", _PREPASS_ROWS, 1))],
        config=Config.make(num_warps=4, num_stages=1),
    )
    return Plan((sums, launch), scratch=(*scratch, ("row_sumsq", (split_rows(meta), "fp32"))))


SPEC = KernelSpec("rms_norm_linear", configs, default, plan, tune_buckets=(1, 16, 64, 256))


def rms_norm_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None, cos_sin: torch.Tensor | None = None,
                    slot_mapping: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
                    v_cache: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                    norm_w: torch.Tensor | None = None, *, eps: float, act: str | None = None,
                    num_q_heads: int = 0, num_kv_heads: int = 0, head_dim: int = 0, rotary_dim: int = 0,
                    is_neox: bool = True, write_cache: bool = False, out: torch.Tensor | None = None,
                    config: Config | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K], w [N, K] (norm weight folded in), bias [N] or None -> out [T, N] in x's dtype, via the kernel.

    norm_w [K] (a quantized w, which cannot take the norm weight): the kernel multiplies x by it after the sum of
    squares, out = rstd(x) * ((x * norm_w) @ w^T).

    act "silu_mul": w (and bias) rows interleaved gate/up, out [T, N / 2] = silu(gate) * up; "gelu_tanh_mul" the
    same with gelu_tanh(gate).
    act "rope": w (and bias) the qkv rows in RopeEpilogue.row_order; out [T, N] = qkv rotated by positions [T] i32
    over cos_sin [max_pos, rotary_dim] fp32, as kernels/rope.py leaves it; with write_cache also the k and v heads
    stored to k_cache / v_cache [num_blocks, block_size, Hk, Dh] at slot_mapping [T] i32 (-1: skip), and
    (out, k_cache, v_cache) returned.
    """
    T, K = x.shape
    N = w.shape[0]
    w_cols = K // 2 if is_int4(w, scale) else K
    N_out = N // 2 if act in ("silu_mul", "gelu_tanh_mul") else N  # rope writes qkv at its own width
    assert x.stride(1) == 1 and w.shape == (N, w_cols) and w.is_contiguous(), \
        "x [T, K] unit column stride, w [N, K] (int4: [N, K / 2])"
    assert bias is None or bias.shape == (N,)
    if out is None:
        out = torch.empty(T, N_out, dtype=x.dtype, device=x.device)
    assert out.shape == (T, N_out) and out.stride(1) == 1
    meta = {"K": K, "N": N, "eps": eps, "has_bias": bias is not None, "act": act, "stride_x": x.stride(0),
            "stride_out": out.stride(0), "max_T": T, "max_S": 1, "T_bucket": T}
    tensors = {"x": x, "w": w, "out": out}
    if scale is not None:
        meta |= quant_meta(w, scale, K)
        tensors["scale"] = scale
    if bias is not None:
        tensors["bias"] = bias
    if norm_w is not None:
        assert norm_w.shape == (K,), "norm_w [K]"
        meta["use_norm_w"], tensors["norm_w"] = True, norm_w
    rope = None
    if act == "rope":
        rope = RopeEpilogue(num_q_heads, num_kv_heads, head_dim, rotary_dim, is_neox, write_cache)
        meta |= rope.attrs()
        tensors |= rope_inputs(rope, T, positions, cos_sin, slot_mapping, k_cache, v_cache)
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return (out, k_cache, v_cache) if rope is not None and rope.write_cache else out


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, cos_sin: torch.Tensor | None = None,
              slot_mapping: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
              v_cache: torch.Tensor | None = None, scale: torch.Tensor | None = None,
              norm_w: torch.Tensor | None = None, *, eps: float, act: str | None = None, num_q_heads: int = 0,
              num_kv_heads: int = 0, head_dim: int = 0, rotary_dim: int = 0, is_neox: bool = True,
              write_cache: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xf = x.float()
    xg = xf if norm_w is None else xf * norm_w.float()
    out = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (xg @ dequantize(w, scale).T)
    if bias is not None:
        out = out + bias.float()
    if act in ("silu_mul", "gelu_tanh_mul"):
        gate, up = out[:, 0::2], out[:, 1::2]  # interleaved rows: gate_j at 2j, up_j at 2j + 1
        gated = torch.nn.functional.silu(gate) if act == "silu_mul" else \
            torch.nn.functional.gelu(gate, approximate="tanh")
        out = gated * up
    elif act == "rope":
        rope = RopeEpilogue(num_q_heads, num_kv_heads, head_dim, rotary_dim, is_neox, write_cache)
        return rope_epilogue_reference(out, positions, cos_sin, slot_mapping, k_cache, v_cache, rope, x.dtype)
    elif act is not None:
        raise ValueError(f"act {act!r} is not None, 'silu_mul', 'gelu_tanh_mul' or 'rope'")
    return out.to(x.dtype)
