"""Logits of the rows asked for: out[r, :] = (rms_norm(x[last_idx[r]]) * norm_w) @ weight^T, in fp32.

weight is the lm_head or the tied embedding, [V, D], not folded (the embedding shares it). At decode the op is a
skinny GEMM, R rows (the batch) against a weight of V x D (1 GB at V=128256, D=4096 in bf16), so its cost is
reading that weight, and the weight must be read once per launch whatever R is. Grid (cdiv(V, BLOCK_V),): a
program owns BLOCK_V vocabulary rows and walks the R requested rows in blocks of BLOCK_R (gathered through
last_idx); for each D chunk it loads its weight tile [BLOCK_V, BLOCK_D] once and multiplies it with every row of
the block, with tl.dot (rows padded to BLOCK_R >= 16, tensor cores) or, for 1..4 rows, a broadcast multiply and
sum in fp32. When R > BLOCK_R the program loops over row blocks and re-reads its weight slice; the configs pick
BLOCK_R to cover the rows of their token bucket (up to 128), so that only happens for batches above 128.

The norm: each row's rstd comes from its own short pass over the row's D elements before the product (x is tiny
next to the weight and stays in cache). It does not share the product's loop: a tl.dot operand also reduced in
registers miscompiled on sm_90 with num_stages >= 3 (seen in rms_norm_linear, Triton 3.6). On the tl.dot path
rstd and norm_w scale each x chunk before it meets the weight, as HF normalises before lm_head: the operand is
the normed activation, O(1), in range for fp16 whatever the hidden states' scale. The broadcast path is fp32
throughout, so it multiplies norm_w into x and rstd into its accumulator at the end.

Soft-capping (USE_SOFTCAP, Gemma 2's final_logit_softcapping): each logit z is stored as cap * tanh(z / cap).

A quantized weight (attr quant, kernels/weight_quant.py, the matmul weights' schemes with D as their K): W_INT8, int8
rows with an fp32 scale per vocabulary row (weight_scale [V]); W_INT4, rows of D / 2 bytes, two 4-bit q each, with an
fp32 (scale, min) per group of GROUP_SIZE along D (weight_scale [V, D / GROUP_SIZE, 2]). Each weight tile is
dequantized in fp32 as it is loaded (_weight_tile; int4 and int8_group, a GGUF's Q8_0 / Q5_K / Q6_K table with int4's
(scale, min) pairs over int8 q, through matmul_helpers.load_grouped), then meets x as a tile of
the unquantized weight would: the tl.dot path rounds it once to the activation dtype (exact for int8 q * scale only
in fp32), the broadcast path stays fp32. A tied embedding's table is the same tensor the embedding kernel reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_helpers import soft_cap, softcap_constexprs
from kernels.matmul_configs import quant_meta, weight_launch_pieces
from kernels.matmul_helpers import load_grouped
from kernels.pdl import enter
from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run
from kernels.weight_quant import dequantize, is_int4


@triton.jit
def _row_sumsq(x_rows, r_mask, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum(x^2) of each row of the block, [BLOCK_R] fp32, in a pass of its own (see the module docstring)."""
    sumsq = tl.full((BLOCK_R,), 0.0, tl.float32)
    for d in range(0, D, BLOCK_D):
        cols = d + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows + cols[None, :], mask=r_mask[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    return sumsq


@triton.jit
def _weight_tile(
    weight_ptr,  # [V, D]; int8 with W_INT8; [V, D / 2] u8 with W_INT4
    weight_scale_ptr,  # [V] fp32 (W_INT8); [V, D / GROUP_SIZE, 2] fp32 (GROUP_SIZE > 0)
    vocab,  # [BLOCK_V] int64
    d,  # first column of the chunk, a multiple of BLOCK_D
    D: tl.constexpr,
    V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    W_INT8: tl.constexpr,
    W_INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
):
    """weight[vocab, d:d + BLOCK_D], [BLOCK_V, BLOCK_D]: in its own dtype, or dequantized to fp32; 0 outside."""
    if GROUP_SIZE > 0:
        w = load_grouped(weight_ptr, weight_scale_ptr, vocab, d, N=V, K=D, BLOCK_N=vocab.shape[0], BLOCK_K=BLOCK_D,
                         EVEN_K=EVEN_D, GROUP_SIZE=GROUP_SIZE, EVICT_FIRST=False, W_INT4=W_INT4)
    else:
        cols = d + tl.arange(0, BLOCK_D)
        v_mask = vocab < V
        if EVEN_D:
            mask = v_mask[:, None]
        else:
            mask = v_mask[:, None] & (cols < D)[None, :]
        w = tl.load(weight_ptr + vocab[:, None] * D + cols[None, :], mask=mask, other=0.0)
        if W_INT8:
            w = w.to(tl.float32) * tl.load(weight_scale_ptr + vocab, mask=v_mask, other=0.0)[:, None]
    return w


@triton.jit
def _rows_dot(
    x_ptr,  # [T, D]
    norm_w_ptr,  # [D]
    weight_ptr,  # [V, D]; int8 with W_INT8; [V, D / 2] u8 with W_INT4
    weight_scale_ptr,  # [V] fp32 (W_INT8); [V, D / GROUP_SIZE, 2] fp32 (W_INT4)
    last_idx_ptr,  # [R] i32
    out_ptr,  # [R, V] fp32
    r0,
    R,
    vocab,  # [BLOCK_V] int64
    stride_x,
    stride_out,
    eps,
    D: tl.constexpr,
    V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    SOFTCAP: tl.constexpr,
    W_INT8: tl.constexpr,
    W_INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
):
    """Rows r0 .. r0 + BLOCK_R on tensor cores: acc[BLOCK_R, BLOCK_V] = normed x @ weight tile^T, rows padded."""
    rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
    r_mask = rows < R
    v_mask = vocab < V
    x_rows = x_ptr + tl.load(last_idx_ptr + rows, mask=r_mask, other=0).to(tl.int64)[:, None] * stride_x
    rstd = 1.0 / tl.sqrt(_row_sumsq(x_rows, r_mask, D, BLOCK_R, BLOCK_D) / D + eps)
    acc = tl.full((BLOCK_R, BLOCK_V), 0.0, tl.float32)
    for d in range(0, D, BLOCK_D):
        cols = d + tl.arange(0, BLOCK_D)
        if EVEN_D:
            x = tl.load(x_rows + cols[None, :], mask=r_mask[:, None], other=0.0)
            g = tl.load(norm_w_ptr + cols)
        else:
            d_mask = cols < D
            x = tl.load(x_rows + cols[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0)
            g = tl.load(norm_w_ptr + cols, mask=d_mask, other=0.0)
        w = _weight_tile(weight_ptr, weight_scale_ptr, vocab, d, D=D, V=V, BLOCK_D=BLOCK_D, EVEN_D=EVEN_D,
                         W_INT8=W_INT8, W_INT4=W_INT4, GROUP_SIZE=GROUP_SIZE)
        if W_INT8 or GROUP_SIZE > 0:
            w = w.to(x.dtype)  # the dequantized weight rounded once to the activation dtype (none in fp32)
        # The operand is the normed activation, O(1): in range for fp16 whatever the hidden states' scale.
        xn = x.to(tl.float32) * rstd[:, None] * g.to(tl.float32)[None, :]
        if w.dtype == tl.float32:
            # fp32 models expect fp32 results; the default tf32 would round operands to 10 mantissa bits.
            acc = tl.dot(xn, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(xn.to(w.dtype), tl.trans(w), acc)
    if USE_SOFTCAP:
        acc = soft_cap(acc, SOFTCAP)
    tl.store(out_ptr + rows[:, None] * stride_out + vocab[None, :], acc, mask=r_mask[:, None] & v_mask[None, :])


@triton.jit
def _rows_broadcast(
    x_ptr,  # [T, D]
    norm_w_ptr,  # [D]
    weight_ptr,  # [V, D]; int8 with W_INT8; [V, D / 2] u8 with W_INT4
    weight_scale_ptr,  # [V] fp32 (W_INT8); [V, D / GROUP_SIZE, 2] fp32 (W_INT4)
    last_idx_ptr,  # [R] i32
    out_ptr,  # [R, V] fp32
    r0,
    R,
    vocab,  # [BLOCK_V] int64
    stride_x,
    stride_out,
    eps,
    D: tl.constexpr,
    V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    SOFTCAP: tl.constexpr,
    W_INT8: tl.constexpr,
    W_INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
):
    """Rows r0 .. r0 + BLOCK_R (1..4) in fp32 registers: each row in turn meets the weight tile, which is reduced
    along D in the layout it was loaded in. The accumulator is [BLOCK_V, BLOCK_R] so that a row's [BLOCK_V]
    products drop into it without a layout change; all in fp32, rstd scales it once at the end."""
    ids = tl.arange(0, BLOCK_R)
    rows = r0 + ids.to(tl.int64)
    r_mask = rows < R
    v_mask = vocab < V
    x_rows = x_ptr + tl.load(last_idx_ptr + rows, mask=r_mask, other=0).to(tl.int64)[:, None] * stride_x
    sumsq = _row_sumsq(x_rows, r_mask, D, BLOCK_R, BLOCK_D)
    acc = tl.full((BLOCK_V, BLOCK_R), 0.0, tl.float32)
    for d in range(0, D, BLOCK_D):
        cols = d + tl.arange(0, BLOCK_D)
        d_mask = cols < D
        if EVEN_D:
            g = tl.load(norm_w_ptr + cols).to(tl.float32)
        else:
            g = tl.load(norm_w_ptr + cols, mask=d_mask, other=0.0).to(tl.float32)
        w = _weight_tile(weight_ptr, weight_scale_ptr, vocab, d, D=D, V=V, BLOCK_D=BLOCK_D, EVEN_D=EVEN_D,
                         W_INT8=W_INT8, W_INT4=W_INT4, GROUP_SIZE=GROUP_SIZE).to(tl.float32)
        for i in tl.static_range(BLOCK_R):
            live = r0 + i < R
            src = tl.load(last_idx_ptr + r0 + i, mask=live, other=0).to(tl.int64)
            x = tl.load(x_ptr + src * stride_x + cols, mask=live & d_mask, other=0.0).to(tl.float32)
            part = tl.sum(w * (x * g)[None, :], axis=1)
            acc += tl.where(ids[None, :] == i, part[:, None], 0.0)
    acc = acc * (1.0 / tl.sqrt(sumsq / D + eps))[None, :]
    if USE_SOFTCAP:
        acc = soft_cap(acc, SOFTCAP)
    tl.store(out_ptr + rows[None, :] * stride_out + vocab[:, None], acc, mask=v_mask[:, None] & r_mask[None, :])


@triton.jit
def _logits_kernel(
    x_ptr,  # [T, D], hidden states before the final norm
    norm_w_ptr,  # [D]
    weight_ptr,  # [V, D]; int8 with W_INT8; [V, D / 2] u8, two int4 per byte, with W_INT4
    last_idx_ptr,  # [R] i32, the row of x whose logits each output row holds
    out_ptr,  # [R, V] fp32
    R,
    stride_x,
    stride_out,
    eps,
    D: tl.constexpr,
    V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    SOFTCAP: tl.constexpr,  # the cap; read only with USE_SOFTCAP
    # Last and with defaults, so an index from before the quantized lm_head binds and runs as it was.
    W_INT8: tl.constexpr = False,
    W_INT4: tl.constexpr = False,
    GROUP_SIZE: tl.constexpr = 0,
    weight_scale_ptr=None,  # [V] fp32 (W_INT8); [V, D / GROUP_SIZE, 2] fp32 (W_INT4); else bound to weight, unread
    USE_PDL: tl.constexpr = False,  # kernels/pdl.py; last with a default, so older indexes run interpreted
):
    enter(USE_PDL)
    vocab = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    for r0 in range(0, R, BLOCK_R):
        if USE_DOT:
            _rows_dot(x_ptr, norm_w_ptr, weight_ptr, weight_scale_ptr, last_idx_ptr, out_ptr, r0, R, vocab, stride_x,
                      stride_out, eps, D, V, BLOCK_R, BLOCK_V, BLOCK_D, EVEN_D, USE_SOFTCAP=USE_SOFTCAP,
                      SOFTCAP=SOFTCAP, W_INT8=W_INT8, W_INT4=W_INT4, GROUP_SIZE=GROUP_SIZE)
        else:
            _rows_broadcast(x_ptr, norm_w_ptr, weight_ptr, weight_scale_ptr, last_idx_ptr, out_ptr, r0, R, vocab,
                            stride_x, stride_out, eps, D, V, BLOCK_R, BLOCK_V, BLOCK_D, EVEN_D,
                            USE_SOFTCAP=USE_SOFTCAP, SOFTCAP=SOFTCAP, W_INT8=W_INT8, W_INT4=W_INT4,
                            GROUP_SIZE=GROUP_SIZE)


# Fewest programs the heuristic accepts before narrowing BLOCK_V: two per SM of an H100 (132 SMs), so every SM
# has loads in flight while another program waits.
_MIN_PROGRAMS = 264
# Operand elements (x tile + weight tile) per pipeline stage of the tl.dot layout: 16 KB in bf16, so three
# stages fit gfx942's 64 KB of LDS (fp32 runs with two, see plan()).
_STAGE_ELEMENTS = 8192


def _rows(meta: dict) -> int:
    """The most rows a launch of this variant sees: its token bucket, and never more than max_S (R <= max_S)."""
    return max(1, min(int(meta.get("T_bucket", meta["max_T"])), meta["max_S"]))


def _block_r(rows: int) -> int:
    """Rows per block: exactly 1, up to 4 for the broadcast product, else a tl.dot tile of 16..128 covering rows."""
    if rows <= 4:
        return triton.next_power_of_2(rows)
    return min(128, max(16, triton.next_power_of_2(rows)))


def _config(meta: dict, block_r: int, block_v: int, block_d: int, warps: int, stages: int = 3) -> Config:
    block_d = min(block_d, max(16, triton.next_power_of_2(meta["D"])))
    use_dot = block_r >= 16
    if use_dot:
        while (block_r + block_v) * block_d > _STAGE_ELEMENTS and block_d > 16:
            block_d //= 2
    return Config.make(num_warps=warps, num_stages=stages, BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_D=block_d,
                       USE_DOT=use_dot)


def configs(meta: dict) -> list[Config]:
    """At most six candidates for the bucket's row count, as (BLOCK_R, BLOCK_V, BLOCK_D, warps, stages)."""
    rows = _rows(meta)
    br = _block_r(rows)
    if rows == 1:
        shapes = [(1, 32, 128, 4, 3), (1, 16, 128, 4, 3), (1, 64, 64, 4, 3), (1, 32, 256, 8, 3), (1, 64, 128, 8, 3)]
    elif rows <= 4:
        shapes = [(br, 16, 128, 4, 3), (br, 32, 64, 4, 3), (br, 16, 256, 8, 3), (16, 64, 64, 4, 3),
                  (16, 32, 128, 4, 3), (16, 128, 64, 4, 3)]
    elif rows <= 64:
        shapes = [(br, 64, 64, 4, 3), (br, 32, 128, 4, 3), (br, 128, 64, 4, 3), (br, 64, 64, 8, 4),
                  (br, 128, 32, 8, 4), (br, 32, 64, 4, 4)]
    else:
        shapes = [(br, 64, 32, 8, 3), (br, 128, 32, 8, 3), (br, 64, 32, 4, 4), (64, 64, 64, 4, 3),
                  (64, 128, 32, 8, 3)]
    return list(dict.fromkeys(_config(meta, *s) for s in shapes))


def default(meta: dict) -> Config:
    """Heuristic for H100-class GPUs when nothing was tuned."""
    D, V, rows = meta["D"], meta["V"], _rows(meta)
    if rows == 1:
        # The broadcast GEMV measured at 361 us for V = 128256, D = 4096 in bf16 on an H100 (2.9 TB/s): 32 x 128
        # weight elements a step, 32 registers a thread at 4 warps, V / 32 programs. A D chunk that divides D
        # (576 = 9 x 64) leaves no half-masked last chunk.
        return _config(meta, 1, 32, 64 if D % 128 and D % 64 == 0 else 128, 4)
    # Two rows and up: tensor cores, rows padded to 16. Per weight byte that is far fewer instructions than the
    # broadcast product (which reduces across lanes once per row), and the weight tiles stream through a cp.async
    # pipeline. 64 x 64 tiles at 4 warps and 3 stages are what autotuning picked on an H100 for linear's same
    # layout (tl.dot, 16 and 64 rows); 64-wide slices leave V / 64 programs (500 at V = 32000, ~4 per SM),
    # dropping to 32 only for a small vocabulary.
    bv = 64 if triton.cdiv(V, 64) >= _MIN_PROGRAMS else 32
    if rows > 64:
        # 128 rows a block: the weight is read once per 128 rows; 8 warps keep the 128 x 64 fp32 accumulator at
        # 32 registers a thread.
        return _config(meta, 128, bv, 32, 8)
    return _config(meta, max(16, _block_r(rows)), bv, 64, 4)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    D, V = meta["D"], meta["V"]
    # fp32 operands take twice the shared memory per stage: at most two stages keeps gfx942 within 64 KB.
    # A quantized weight's tiles meet x in the activation dtype (x's).
    operand = dtypes["x"] if meta.get("quant") not in (None, "none") else dtypes["weight"]
    stages = min(config.num_stages, 2) if operand == "fp32" else config.num_stages
    w_types, w_args, w_constexprs = weight_launch_pieces(meta, dtypes, "weight", "weight_scale", "D",
                                                         "weight_scale_ptr")
    launch = make_launch(
        _logits_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "norm_w_ptr": ptr(dtypes["norm_w"]), "weight_ptr": ptr(dtypes["weight"]),
               "last_idx_ptr": ptr(dtypes["last_idx"]), "out_ptr": ptr(dtypes["out"]), "R": "i32",
               "stride_x": "i64", "stride_out": "i64", "eps": "fp32", **w_types},
        constexprs={"D": D, "V": V, "EVEN_D": D % config["BLOCK_D"] == 0, **softcap_constexprs(meta),
                    "USE_PDL": False,
                    **{k: config[k] for k in ("BLOCK_R", "BLOCK_V", "BLOCK_D", "USE_DOT")}, **w_constexprs},
        args={"x_ptr": ("tensor", "x"), "norm_w_ptr": ("tensor", "norm_w"), "weight_ptr": ("tensor", "weight"),
              "last_idx_ptr": ("tensor", "last_idx"), "out_ptr": ("tensor", "out"), "R": ("sym", "R"),
              "stride_x": ("int", meta.get("stride_x", D)), "stride_out": ("int", meta.get("stride_out", V)),
              "eps": ("float", meta["eps"]), **w_args},
        grid=[grid_dim(triton.cdiv(V, config["BLOCK_V"]))],
        config=Config(config.constexprs, config.num_warps, stages),
    )
    return Plan((launch,))


# Decode batches get their own configs: 1 row (broadcast GEMV), 2..4 rows (broadcast or 16-row tensor-core tiles:
# the tuner decides), 5..16 and 17..64 rows (tl.dot, BLOCK_R covering the batch); the last bucket covers up to
# max_S rows (128-row blocks beyond 64).
SPEC = KernelSpec("logits", configs, default, plan, tune_buckets=(1, 4, 16, 64))


def logits(x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, last_idx: torch.Tensor, *, eps: float,
           softcap: float = 0.0, weight_scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """x [T, D], norm_w [D], weight [V, D], last_idx [R] i32 (each < T) -> out [R, V] fp32, via the kernel;
    softcap > 0: each logit z soft-capped to softcap * tanh(z / softcap). weight_scale: a quantized weight (int8
    [V, D] with [V] fp32, or packed int4 [V, D / 2] with [V, D / G, 2] fp32)."""
    T, D = x.shape
    V = weight.shape[0]
    R = last_idx.shape[0]
    cols = D // 2 if is_int4(weight, weight_scale) else D
    assert x.stride(1) == 1 and norm_w.shape == (D,) and weight.shape == (V, cols) and weight.is_contiguous()
    assert last_idx.dtype == torch.int32 and last_idx.dim() == 1
    if out is None:
        out = torch.empty(R, V, dtype=torch.float32, device=x.device)
    assert out.shape == (R, V) and out.dtype == torch.float32 and out.stride(1) == 1
    meta = {"D": D, "V": V, "eps": eps, "softcap": softcap, "stride_x": x.stride(0), "stride_out": out.stride(0),
            "max_T": T, "max_S": max(R, 1), "T_bucket": max(T, R)}
    tensors = {"x": x, "norm_w": norm_w, "weight": weight, "last_idx": last_idx, "out": out}
    if weight_scale is not None:
        meta |= quant_meta(weight, weight_scale, D)
        tensors["weight_scale"] = weight_scale
    run(plan(meta, {k: dtype_name(t) for k, t in tensors.items()}, config or default(meta)), tensors,
        {"T": T, "S": R, "R": R})
    return out


def reference(x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, last_idx: torch.Tensor,
              weight_scale: torch.Tensor | None = None, *, eps: float, softcap: float = 0.0) -> torch.Tensor:
    h = x[last_idx.long()].float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_w.float()
    out = h @ dequantize(weight, weight_scale).T
    return out if softcap == 0 else torch.tanh(out / softcap) * softcap
