"""Configs, heuristics and plan pieces of the matmul layouts in kernels/matmul_helpers.py (`linear`,
`rms_norm_linear`): which GEMV / split-K / GEMM tiles to try per token bucket, the default when nothing was
tuned, the constexprs and grid of a launch, and the split-K scratch (partials, sums of squares, semaphores).
"""

from __future__ import annotations

import torch
import triton

from kernels.spec import SEMAPHORES, Arg, Config, GridDim, grid_dim, ptr
from kernels.weight_quant import INT4_GROUP_SIZES, INT8_GROUP_SIZES, QUANT_SCHEMES, scheme_of

# Notional number of SMs/CUs used to size split-K when no GPU is at hand (H100/H200: 132, MI300X: 304): enough
# programs that every SM holds a few and the memory system sees enough loads in flight.
_TARGET_PROGRAMS = 512


def t_bucket(meta: dict) -> int:
    """The most tokens the chosen config will see: the compiler's token bucket, else the artifact's max_T."""
    return int(meta.get("T_bucket", meta["max_T"]))


def gemv(block_m: int, block_n: int, block_k: int, split_k: int, use_dot: bool, warps: int = 4,
         stages: int = 3) -> Config:
    return Config.make(num_warps=warps, num_stages=stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       SPLIT_K=split_k, GROUP_M=1, LOOP_M=True, USE_DOT=use_dot)


def gemm(block_m: int, block_n: int, block_k: int, warps: int, stages: int = 3) -> Config:
    return Config.make(num_warps=warps, num_stages=stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       SPLIT_K=1, GROUP_M=8, LOOP_M=False, USE_DOT=True)


def _split_for(N: int, K: int, block_n: int, block_k: int, programs: int) -> int:
    """The fewest K splits (a power of two, at most 16) that give at least ``programs`` programs, keeping at least
    one BLOCK_K chunk per split."""
    split = 1
    while split < 16 and triton.cdiv(N, block_n) * split < programs and K >= block_k * split * 2:
        split *= 2
    return split


def _broadcast_candidates(N: int, K: int, bm: int, min_bn: int) -> list[Config]:
    """Weight-streaming GEMVs for 1..4 rows: every SM needs tens of KB of weight loads in flight for the whole
    kernel, from enough resident programs, each loading 8-16 KB per K step. On an H200 (benchmarks/gemv.py, every
    decode shape of the 1.1B and 8B presets at one row) the winners were long K chunks over few columns (2-16)
    at 4 warps, without split-K: a full 2048-wide K chunk for K = 2048, 1024 at 8 columns for K >= 4096. One
    split-K candidate stays for matrices whose column blocks alone leave SMs idle."""
    bk_max = triton.next_power_of_2(K)
    out = []
    for elems, bk in ((4096, 2048), (4096, 1024), (4096, 512), (4096, 256), (8192, 2048), (8192, 1024),
                      (8192, 512)):
        bk = min(bk, bk_max)
        out.append(gemv(bm, max(min_bn, elems // (bk * bm)), bk, 1, False, 4, 1))
    bk = min(256, bk_max)
    bn = max(min_bn, 8192 // (bk * bm))
    out.append(gemv(bm, bn, bk, _split_for(N, K, bn, bk, _TARGET_PROGRAMS), False, 4, 1))
    return list(dict.fromkeys(out))


def _min_block_n(meta: dict) -> int:
    """The SwiGLU/GeGLU and rope epilogues pair adjacent columns, so their column blocks hold at least one pair (and,
    being powers of two, only whole pairs)."""
    return 2 if meta.get("act") in ("silu_mul", "gelu_tanh_mul", "rope") else 1


# K-chunks of int8 rows at least this long: 16 bytes, one vector load per thread.
INT8_MIN_BLOCK_K = 16
# int4 rows: 32 values are 16 packed bytes; a chunk is also split into whole bytes (an even BLOCK_K).
INT4_MIN_BLOCK_K = 32


def quant_meta(w: torch.Tensor, scale: torch.Tensor, K: int) -> dict:
    """The node attrs (quant, group_size) of a launcher's quantized w and scale, shapes and dtypes checked."""
    N = w.shape[0]
    quant, group = scheme_of(w, scale)
    if quant in ("int4", "int8_group"):
        groups = scale.shape[1]
        cols = K // 2 if quant == "int4" else K
        assert groups and K % groups == 0 and w.shape == (N, cols) and scale.shape == (N, groups, 2) and \
            scale.dtype == torch.float32, "int4: u8 w [N, K / 2]; int8_group: i8 w [N, K]; fp32 scale [N, K / G, 2]"
        return {"quant": quant, "group_size": group}
    assert w.dtype == torch.int8 and scale.shape == (N,) and scale.dtype == torch.float32, "int8 w, fp32 scale [N]"
    return {"quant": "int8"}


# The dtype of w and the group sizes of each scheme (kernels/weight_quant.py).
_SCHEME_W = {"none": None, "int8": "i8", "int4": "u8", "int8_group": "i8"}
_SCHEME_GROUPS = {"int4": INT4_GROUP_SIZES, "int8_group": INT8_GROUP_SIZES}


def weight_scheme(meta: dict, dtypes: dict, w: str = "w", scale: str = "scale", k: str = "K") -> str:
    """The node's weight scheme (attr quant: kernels/weight_quant.py; absent or "none": w in the activation dtype),
    checked against the dtypes of w and scale and, for the grouped schemes, the group size against K. The roles and
    the size key are the matmuls'; embedding and logits name theirs (weight, weight_scale, D)."""
    quant = meta.get("quant") or "none"
    if quant not in QUANT_SCHEMES:
        raise ValueError(f"quant {quant!r} is not one of {', '.join(QUANT_SCHEMES)}")
    want = _SCHEME_W[quant]
    if quant == "none":
        if scale in dtypes or dtypes[w] in ("i8", "u8"):
            raise ValueError(f"quant none: {w} is {dtypes[w]} and {scale} {dtypes.get(scale, 'absent')}; a "
                             f"quantized {w} needs attr quant int8, int4 or int8_group")
        return quant
    if dtypes[w] != want or dtypes.get(scale) != "fp32":
        raise ValueError(f"quant {quant}: {w} is {dtypes[w]} and {scale} {dtypes.get(scale, 'absent')}; {quant} "
                         f"needs a {want} {w} and an fp32 {scale}")
    if quant in _SCHEME_GROUPS:
        group, sizes = meta.get("group_size"), _SCHEME_GROUPS[quant]
        if group not in sizes or meta[k] % group:
            raise ValueError(f"quant {quant}: group_size {group} must be one of {sizes} and divide {k} = {meta[k]}")
    return quant


def weight_launch_pieces(meta: dict, dtypes: dict, w: str = "w", scale: str = "scale", k: str = "K",
                         pointer: str = "scale_ptr") -> tuple[dict[str, str], dict[str, Arg], dict]:
    """The scale pointer's type and binding and the W_INT8 / W_INT4 / GROUP_SIZE constexprs; without a scheme the
    pointer is bound to w, unread. GROUP_SIZE > 0 means a (scale, min) pair per group: int4 (W_INT4, packed) or
    int8_group (neither flag: int8 q, dequantized per group as it is loaded, kernels/matmul_helpers.py)."""
    quant = weight_scheme(meta, dtypes, w, scale, k)
    role = w if quant == "none" else scale
    grouped = quant in _SCHEME_GROUPS
    return ({pointer: ptr(dtypes[role])}, {pointer: ("tensor", role)},
            {"W_INT8": quant == "int8", "W_INT4": quant == "int4", "GROUP_SIZE": meta["group_size"] if grouped else 0})


def _fits_scheme(meta: dict, configs: list[Config]) -> list[Config]:
    """int8 rows are loaded in chunks of at least INT8_MIN_BLOCK_K (where K allows): shorter ones lose the 16-byte
    loads; int4 rows in chunks of at least INT4_MIN_BLOCK_K (16 packed bytes; K, a multiple of the group size, is
    at least 32). The candidates keep their element counts: the broadcast product's accumulator is fp32 per element
    whatever the weight dtype, so registers, not bytes, bound its tile; an int8 tile reads half the bytes of a
    16-bit one, an int4 tile a quarter (plus one (scale, min) pair per row and group). A chunk longer than the
    group is allowed: it holds whole groups and loads one pair per group (kernels/matmul_helpers.py, load_grouped)."""
    quant = meta.get("quant") or "none"
    if quant == "none":
        return configs
    least = {"int8": INT8_MIN_BLOCK_K, "int8_group": INT8_MIN_BLOCK_K, "int4": INT4_MIN_BLOCK_K}[quant]
    least = min(least, triton.next_power_of_2(meta["K"]))
    return [c for c in configs if c["BLOCK_K"] >= least]


def matmul_configs(meta: dict) -> list[Config]:
    """Candidates for one token bucket: GEMV layouts for decode-sized T, GEMM tiles for prefill."""
    return _fits_scheme(meta, _candidates(meta))


def _candidates(meta: dict) -> list[Config]:
    N, K, T = meta["N"], meta["K"], t_bucket(meta)
    if T <= 4:
        return _broadcast_candidates(N, K, triton.next_power_of_2(T), _min_block_n(meta))
    if T <= 64:
        bm = max(16, triton.next_power_of_2(T))
        # The H200 sweep's winners at 4..16 rows: 32-64 columns by 128 of K, 4 stages, with and without split-K.
        # Stages are capped so the operand tiles fit gfx942's 64 KB of LDS in 16-bit dtypes.
        return list(dict.fromkeys(
            gemv(bm, bn, bk, _split_for(N, K, bn, bk, programs), True, 4, min(4, 32768 // ((bm + bn) * bk)))
            for bn, bk in ((64, 128), (32, 128), (64, 64)) for programs in (1, _TARGET_PROGRAMS)))
    # Tiles of at most 8192 operand elements per pipeline stage fit gfx942's 64 KB of LDS; the larger ones are
    # sm_90's (227 KB), where Llama-3-8B's o and down at 2,048 rows ran at 0.86-0.91x of cuBLAS with 128 x 256 x 64
    # tiles against 0.67x with the best small one (H200, benchmarks/gemv.py). A target whose shared memory cannot
    # hold a chosen tile gets fewer stages or the default there (compiler/build.py).
    small = [gemm(bm, bn, bk, w) for bm, bn, bk, w in
             ((64, 64, 64, 4), (64, 128, 32, 4), (128, 64, 32, 4), (128, 128, 32, 8), (128, 128, 32, 4))]
    large = [gemm(128, 256, 64, 8, 3), gemm(128, 256, 64, 8, 4), gemm(128, 128, 128, 8, 3), gemm(128, 128, 64, 8, 4)]
    if T > 256:
        return small + large
    # A mixed step of a few hundred rows: a 128-row tile grid has only N / BLOCK_N programs (48 for Llama-3-8B's
    # qkv), too few for the SMs; the tl.dot layout with split K fills them (at 128 rows: o 0.87x, down 1.0x of
    # cuBLAS on the H200, against 0.5x and 0.4x for the pack's best tile).
    bm = min(128, triton.next_power_of_2(T))
    splits = [gemv(bm, 64, 128, split, True, 8, 4) for split in (1, 2, 4) if K >= 128 * split * 2 or split == 1]
    return splits + [gemv(bm, 128, 64, 1, True, 8, 4), gemm(128, 128, 64, 8, 4), small[3], large[0]]


def matmul_default(meta: dict) -> Config:
    """Heuristic when nothing was tuned: stream W once with enough programs in flight, tensor-core tiles above 64."""
    N, K, T = meta["N"], meta["K"], t_bucket(meta)
    if T <= 4:
        # What won most decode shapes on an H200: 8 KB of weights per K step, the longest K chunk up to 2048; at one
        # row, 16 KB once that would leave 2,048 programs or more (several waves: Llama-3-8B's gate_up 57.4 µs
        # against 66.8, its qkv 15.9 against 16.5, TinyLlama's gate_up the tuner's pick; benchmarks/gemv.py).
        bm = triton.next_power_of_2(T)
        bk = min(2048, triton.next_power_of_2(K))
        bn = max(_min_block_n(meta), 4096 // (bk * bm))
        if bm == 1 and N // bn >= 2048:
            bn *= 2
        return gemv(bm, bn, bk, 1, False, 4, 1)
    if T <= 64:
        bm = max(16, triton.next_power_of_2(T))
        return gemv(bm, 64, 64, _split_for(N, K, 64, 64, _TARGET_PROGRAMS), True)
    return gemm(128, 128, 32, 8) if T >= 256 else gemm(64, 128, 32, 4)


def launch_config(config: Config, dtypes: dict) -> Config:
    """The config's launch options for these dtypes: fp32 operands take twice the shared memory per pipeline
    stage, so they get at most 2 stages (still within gfx942's 64 KB for every candidate tile)."""
    if dtypes["x"] == "fp32" and config.num_stages > 2:
        return Config(config.constexprs, config.num_warps, 2)
    return config


def tile_constexprs(meta: dict, config: Config) -> dict:
    """Constexprs of the launch shared by both ops (sizes, tiles, layout flags, K range per split)."""
    N, K = meta["N"], meta["K"]
    split, bk = config["SPLIT_K"], config["BLOCK_K"]
    if split > 1 and not config["LOOP_M"]:
        raise ValueError(f"split-K needs the GEMV layout (LOOP_M), got {config}")
    k_span = triton.cdiv(triton.cdiv(K, split), bk) * bk
    return {"N": N, "K": K, "K_SPAN": k_span, "EVEN_K": k_span * split == K,
            **{key: config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M", "LOOP_M",
                                            "USE_DOT")}}


def token_count(meta: dict) -> tuple[dict, dict, dict]:
    """The launch's T as (types, args, constexprs) pieces: the step's token count, or the constant 1 in a variant
    that only ever runs one token (token bucket 1: decode at batch 1). Triton's JIT specialises an argument equal to
    1 the same way; the AOT binary with T a runtime argument kept the row loop and masks, and on the H200 its
    batch-1 GEMVs ran that much slower in the model (Llama-3-8B gate_up 68 µs against 57 µs JIT-compiled)."""
    if meta.get("T_bucket") == 1:
        return {}, {}, {"T": 1}
    return {"T": "i32"}, {"T": ("sym", "T")}, {}


def tile_grid(meta: dict, config: Config) -> list[GridDim]:
    num_n = triton.cdiv(meta["N"], config["BLOCK_N"])
    if config["LOOP_M"]:
        return [grid_dim(num_n), grid_dim(config["SPLIT_K"])]
    return [grid_dim(("T", config["BLOCK_M"], num_n))]


def split_rows(meta: dict) -> int:
    """Rows the split-K partials hold: the most tokens the variant runs with."""
    return min(meta["max_T"], t_bucket(meta))


def split_scratch(meta: dict, config: Config, use_rms: bool) -> tuple[tuple[str, tuple[int, str]], ...]:
    """Scratch of a split-K launch: fp32 partials [SPLIT_K, ROWS, N], with the RMSNorm the partial sums of squares
    [column blocks, SPLIT_K, ROWS], and one semaphore per column block."""
    split = config["SPLIT_K"]
    if split == 1:
        return ()
    num_n, rows = triton.cdiv(meta["N"], config["BLOCK_N"]), split_rows(meta)
    sumsq = (("sumsq", (num_n * split * rows, "fp32")),) if use_rms else ()
    return (("partial", (split * rows * meta["N"], "fp32")), *sumsq, (SEMAPHORES, (num_n, "i32")))
