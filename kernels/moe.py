"""Mixture-of-experts MLP: out[T, D] = residual + sum_k weight[t, k] * expert_{ids[t, k]}(x[t]), SwiGLU experts.

Three launches, with the routing kept on the device (no host sync, static grids: CUDA-graph friendly):
  1. router (kernels/moe_router.py): softmax top-k of x @ router^T -> ids [T, TOP_K] i32, weights [T, TOP_K] fp32
     (scratch), renormalised where the config says; with a shared expert also its sigmoid gate.
  2. gate_up: for each (token, k) and block of I columns, act = silu(x @ w13[e, :I]^T) * (x @ w13[e, I:]^T) with
     e = ids[t, k]: only the chosen experts' rows are read (batch-1 decode reads TOP_K / E of the expert bytes).
  3. down: one program owns out[t, block of D] and loops over its TOP_K choices, summing weight * (act @ w2[e]^T)
     in fp32 before adding the residual (and a shared expert's gated output, HAS_SHARED): no atomics, and out may
     alias residual (each element is read, then written, by one program).
w13 [E, 2I, D] holds each expert's gate rows then its up rows (HF's fused ``experts.gate_up_proj``), w2 [E, D, I]
its down projection. Each program of 2 and 3 streams one expert's weight rows as a GEMV does: the form for a step of
one token (configs without BLOCK_M). Steps of more tokens take the grouped form of kernels/moe_grouped.py (configs
with BLOCK_M): tokens grouped by expert on the device and tl.dot tiles per expert, after the same router.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import moe_grouped, moe_router
from kernels.matmul_configs import quant_meta, t_bucket, weight_launch_pieces
from kernels.moe_helpers import expert_base, expert_rows, row_scale
from kernels.spec import Config, KernelSpec, Launch, Plan, dtype_name, grid_dim, make_launch, ptr, run
from kernels.weight_quant import dequantize


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,  # [T, D]
    w13_ptr,  # [E, 2 * I, D]: gate rows, then up rows; int8 with W_INT8; [E, 2 * I, D / 2] u8 with W_INT4
    w13_scale_ptr,  # [E, 2 * I] fp32 (W_INT8); [E, 2 * I, D / GROUP_SIZE, 2] fp32 (W_INT4); else bound to w13
    ids_ptr,  # [T, TOP_K] i32
    act_ptr,  # [T, TOP_K * I]: row t, columns k * I + j: silu(gate_j) * up_j of choice k
    T,
    stride_x,
    D: tl.constexpr,
    I: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_INT8: tl.constexpr = False,
    W_INT4: tl.constexpr = False,
    GROUP_SIZE: tl.constexpr = 0,
):
    pair = tl.program_id(0).to(tl.int64)  # t * TOP_K + k
    t = pair // TOP_K
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = rows < I
    gate_w, gate_s = expert_base(w13_ptr, w13_scale_ptr, expert, ROWS=2 * I, K=D, W_INT8=W_INT8, W_INT4=W_INT4,
                                 GROUP_SIZE=GROUP_SIZE)
    # The up rows start I rows further on, in the weights and (per row) in the scales alike.
    up_w = gate_w + I * (D // 2 if W_INT4 else D)
    up_s = gate_s + (I * (D // GROUP_SIZE) * 2 if W_INT4 else (I if W_INT8 else 0))
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + t * stride_x + cols, mask=cols < D, other=0.0).to(tl.float32)
        wg = expert_rows(gate_w, gate_s, rows, k0, N=I, K=D, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, W_INT4=W_INT4,
                         GROUP_SIZE=GROUP_SIZE, EVICT_FIRST=True)
        wu = expert_rows(up_w, up_s, rows, k0, N=I, K=D, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, W_INT4=W_INT4,
                         GROUP_SIZE=GROUP_SIZE, EVICT_FIRST=True)
        acc_gate += tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
        acc_up += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
    if W_INT8:  # each row's scale, once after the sum over K (it commutes with it)
        acc_gate = acc_gate * row_scale(gate_s, rows, N=I)
        acc_up = acc_up * row_scale(up_s, rows, N=I)
    # HF rounds the gate_up product to the activation dtype before the activation; so do we.
    gate = acc_gate.to(act_ptr.dtype.element_ty).to(tl.float32)
    up = acc_up.to(act_ptr.dtype.element_ty).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up  # silu(g) = g / (1 + e^-g): -0, never NaN, for g -> -inf
    tl.store(act_ptr + pair * I + rows, act.to(act_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def finish(acc, shared_ptr, shared_weight_ptr, residual_ptr, t, cols, mask, stride_res, D: tl.constexpr,
           HAS_SHARED: tl.constexpr, DTYPE: tl.constexpr):
    """residual + the routed experts' sum acc (+ the gated shared expert), each term rounded to DTYPE as HF adds
    them: (experts + sigmoid(gate) * shared) in the dtype, then the residual add."""
    if HAS_SHARED:
        weight = tl.load(shared_weight_ptr + t)
        shared = tl.load(shared_ptr + t * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc = acc.to(DTYPE).to(tl.float32) + (weight * shared).to(DTYPE).to(tl.float32)
    return acc.to(DTYPE).to(tl.float32) + tl.load(residual_ptr + t * stride_res + cols, mask=mask,
                                                   other=0.0).to(tl.float32)



@triton.jit
def _moe_down_kernel(
    src_ptr,  # act [T, TOP_K * I]; with FROM_Y the grouped form's expert outputs y [T * TOP_K, D], already rounded
    w2_ptr,  # [E, D, I]; int8 with W_INT8; [E, D, I / 2] u8 with W_INT4; with FROM_Y bound to src and never read
    w2_scale_ptr,  # [E, D] fp32 (W_INT8); [E, D, I / GROUP_SIZE, 2] fp32 (W_INT4); otherwise bound to w2, unread
    ids_ptr,  # [T, TOP_K] i32; with FROM_Y bound to weights and never read
    weights_ptr,  # [T, TOP_K] fp32
    shared_ptr,  # [T, D] the shared expert's output; without HAS_SHARED bound to residual and never read
    shared_weight_ptr,  # [T] fp32; without HAS_SHARED bound to weights and never read
    residual_ptr,  # [T, D]
    out_ptr,  # [T, D], may alias residual
    T,
    stride_res,
    stride_out,
    D: tl.constexpr,
    I: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    FROM_Y: tl.constexpr,
    W_INT8: tl.constexpr = False,
    W_INT4: tl.constexpr = False,
    GROUP_SIZE: tl.constexpr = 0,
):
    t = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = rows < D
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        weight = tl.load(weights_ptr + t * TOP_K + k)
        if FROM_Y:
            part = tl.load(src_ptr + (t * TOP_K + k) * D + rows, mask=n_mask, other=0.0).to(tl.float32)
        else:
            expert = tl.load(ids_ptr + t * TOP_K + k).to(tl.int64)
            w_base, s_base = expert_base(w2_ptr, w2_scale_ptr, expert, ROWS=D, K=I, W_INT8=W_INT8, W_INT4=W_INT4,
                                         GROUP_SIZE=GROUP_SIZE)
            part = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(src_ptr + (t * TOP_K + k) * I + cols, mask=cols < I, other=0.0).to(tl.float32)
                w = expert_rows(w_base, s_base, rows, k0, N=D, K=I, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, W_INT4=W_INT4,
                                GROUP_SIZE=GROUP_SIZE, EVICT_FIRST=True)
                part += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
            if W_INT8:
                part = part * row_scale(s_base, rows, N=D)
            # Each expert's down product is rounded to the activation dtype before it is weighted, as in HF.
            part = part.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc += weight * part
    acc = finish(acc, shared_ptr, shared_weight_ptr, residual_ptr, t, rows, n_mask, stride_res, D=D,
                             HAS_SHARED=HAS_SHARED, DTYPE=out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_out + rows, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


# (BLOCK_N, BLOCK_K, warps) of the expert GEMVs: few rows and long K chunks stream the weights (the dense GEMVs'
# winners on an H200, kernels/matmul_configs.py), wider row blocks for larger token buckets.
_TILES = ((8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (64, 128, 4), (32, 512, 8))


def _fit(tile: tuple[int, int, int], meta: dict) -> tuple[int, int, int]:
    bn, bk, w = tile
    return (min(bn, triton.next_power_of_2(min(meta["I"], meta["D"]))),
            min(bk, triton.next_power_of_2(min(meta["I"], meta["D"]))), w)


def _config(tile: tuple[int, int, int]) -> Config:
    bn, bk, w = tile
    return Config.make(num_warps=w, num_stages=2, BLOCK_N=bn, BLOCK_K=bk)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps) of the grouped form (kernels/moe_grouped.py), for steps of more than one token;
# small enough in fp32 for gfx942's 64 KB of shared memory at 2 stages (gate and up tiles side by side).
_GROUPED_TILES = ((16, 64, 32, 4), (16, 128, 32, 4), (32, 64, 32, 4), (64, 64, 32, 4), (64, 128, 32, 8))


def _grouped(tile: tuple[int, int, int, int], meta: dict) -> Config:
    bm, bn, bk, w = tile
    bm = min(bm, max(16, triton.next_power_of_2(t_bucket(meta) * meta["top_k"])))
    return moe_grouped.tile_config(bm, bn, bk, w)


def configs(meta: dict) -> list[Config]:
    """GEMV tiles for one token (a decode step of one sequence), grouped tl.dot tiles for more."""
    if t_bucket(meta) > 1:
        return list(dict.fromkeys(_grouped(tile, meta) for tile in _GROUPED_TILES))
    return list(dict.fromkeys(_config(_fit(tile, meta)) for tile in _TILES))


def default(meta: dict) -> Config:
    # One token: 8-row blocks, so that even the down projection (D rows, one program per block looping over the
    # top_k experts) has D / 8 programs: 512 for Mixtral, several per SM of an H200. More: a token tile of
    # 16 pairs per expert up to 64 tokens in the step, 64 beyond.
    if t_bucket(meta) > 1:
        return _grouped(_GROUPED_TILES[0] if t_bucket(meta) <= 64 else _GROUPED_TILES[3], meta)
    return _config(_fit(_TILES[0], meta))


def shared_pieces(meta: dict, dtypes: dict) -> tuple[dict, dict, dict]:
    """(types, args, constexprs) of the shared-expert epilogue parameters (``finish``) of down and combine."""
    has_shared = bool(meta.get("has_shared"))
    shared = ("shared", dtypes["shared"]) if has_shared else ("residual", dtypes["residual"])
    return ({"shared_ptr": ptr(shared[1]), "shared_weight_ptr": "*fp32"},
            {"shared_ptr": ("tensor", shared[0]),
             "shared_weight_ptr": ("tensor", "shared_weight" if has_shared else "topk_weights")},
            {"HAS_SHARED": has_shared})


def _check(meta: dict) -> None:
    E, top_k = meta["E"], meta["top_k"]
    if not 1 <= top_k <= E:
        raise ValueError(f"moe: top_k {top_k} must be between 1 and the number of experts {E}")


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    _check(meta)
    D, I, top_k = meta["D"], meta["I"], meta["top_k"]
    rows = t_bucket(meta) * top_k
    bn, bk = config["BLOCK_N"], config["BLOCK_K"]
    grouped = "BLOCK_M" in dict(config.constexprs)
    has_shared = bool(meta.get("has_shared"))
    router = moe_router.launch(meta, dtypes)
    scratch = (("act", (rows * I, dtypes["out"])), ("topk_ids", (rows, "i32")), ("topk_weights", (rows, "fp32")))
    if has_shared:
        scratch += (("shared_weight", (t_bucket(meta), "fp32")),)
    if grouped:
        tile = Config.make(num_warps=4, num_stages=1, BLOCK_N=min(1024, triton.next_power_of_2(D)), BLOCK_K=16)
        combine = _down(meta, dtypes, tile, from_y=True)
        return Plan((router, *moe_grouped.launches(meta, dtypes, config), combine),
                    scratch=scratch + moe_grouped.scratch(meta, t_bucket(meta), config, dtypes["out"]))
    scale_types, scale_args, quant = weight_launch_pieces(meta, dtypes, "w13", "w13_scale", "D", "w13_scale_ptr")
    gate_up = make_launch(
        _moe_gate_up_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "w13_ptr": ptr(dtypes["w13"]), **scale_types, "ids_ptr": "*i32",
               "act_ptr": ptr(dtypes["out"]), "T": "i32", "stride_x": "i64"},
        constexprs={"D": D, "I": I, "TOP_K": top_k, "BLOCK_N": bn, "BLOCK_K": bk, **quant},
        args={"x_ptr": ("tensor", "x"), "w13_ptr": ("tensor", "w13"), **scale_args, "ids_ptr": ("tensor", "topk_ids"),
              "act_ptr": ("tensor", "act"), "T": ("sym", "T"), "stride_x": ("int", meta.get("stride_x", D))},
        grid=[grid_dim(("T", 1, top_k)), grid_dim(-(-I // bn))], config=config)
    return Plan((router, gate_up, _down(meta, dtypes, config, from_y=False)), scratch=scratch)


def _down(meta: dict, dtypes: dict, config: Config, from_y: bool) -> Launch:
    """The down kernel's launch: the GEMVs over w2, or (from_y) the grouped form's combine of y."""
    D, I, top_k = meta["D"], meta["I"], meta["top_k"]
    bn = config["BLOCK_N"]
    src, w2, ids = ("y", "y", "topk_weights") if from_y else ("act", "w2", "topk_ids")
    shared_types, shared_args, shared_constexprs = shared_pieces(meta, dtypes)
    if from_y:  # the combine reads no weights: w2_scale is bound to y, unread, like w2
        scale_types, scale_args, quant = {"w2_scale_ptr": ptr(dtypes["out"])}, {"w2_scale_ptr": ("tensor", "y")}, {
            "W_INT8": False, "W_INT4": False, "GROUP_SIZE": 0}
    else:
        scale_types, scale_args, quant = weight_launch_pieces(meta, dtypes, "w2", "w2_scale", "I", "w2_scale_ptr")
    return make_launch(
        _moe_down_kernel,
        types={"src_ptr": ptr(dtypes["out"]), "w2_ptr": ptr(dtypes["out"] if from_y else dtypes["w2"]), **scale_types,
               "ids_ptr": "*fp32" if from_y else "*i32", "weights_ptr": "*fp32", **shared_types,
               "residual_ptr": ptr(dtypes["residual"]), "out_ptr": ptr(dtypes["out"]), "T": "i32",
               "stride_res": "i64", "stride_out": "i64"},
        constexprs={"D": D, "I": I, "TOP_K": top_k, "BLOCK_N": bn, "BLOCK_K": config["BLOCK_K"], **shared_constexprs,
                    "FROM_Y": from_y, **quant},
        args={"src_ptr": ("tensor", src), "w2_ptr": ("tensor", w2), **scale_args, "ids_ptr": ("tensor", ids),
              "weights_ptr": ("tensor", "topk_weights"), **shared_args, "residual_ptr": ("tensor", "residual"),
              "out_ptr": ("tensor", "out"), "T": ("sym", "T"), "stride_res": ("int", meta.get("stride_residual", D)),
              "stride_out": ("int", meta.get("stride_out", D))},
        grid=[grid_dim(("T", 1, 1)), grid_dim(-(-D // bn))], config=config)


SPEC = KernelSpec("moe", configs, default, plan, tune_buckets=(1, 16, 64, 256))


def moe(x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, residual: torch.Tensor,
        shared: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None, *, top_k: int,
        renormalize: bool, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
        out: torch.Tensor | None = None, config: Config | None = None,
        scratch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, D], router [E, D], w13 [E, 2I, D], w2 [E, D, I], residual [T, D] -> out [T, D] in x's dtype; with
    shared [T, D] (the shared expert's output) and shared_gate [1, D], sigmoid(x @ shared_gate^T) * shared is added.
    With w13_scale and w2_scale the experts are quantized (both in one scheme, each expert's matrix as a linear's
    weight: kernels/weight_quant.py): int8 w13 / w2 with scales [E, 2I] / [E, D], or packed u8 w13 [E, 2I, D / 2] /
    w2 [E, D, I / 2] with (scale, min) groups [E, 2I, D / G, 2] / [E, D, I / G, 2].

    Runs the kernels (interpreter on CPU tensors); ``scratch`` may hold the act / topk_ids / topk_weights buffers
    (a test reads the routing from them).
    """
    T, D = x.shape
    E, two_i = w13.shape[:2]
    I = two_i // 2
    assert (w13_scale is None) == (w2_scale is None)
    quant = {} if w13_scale is None else quant_meta(w13.flatten(0, 1), w13_scale.flatten(0, 1), D)
    if quant:
        assert quant == quant_meta(w2.flatten(0, 1), w2_scale.flatten(0, 1), I), "w13 and w2 in one scheme"
    packed = 2 if quant.get("quant") == "int4" else 1
    assert x.stride(1) == 1 and router.shape == (E, D) and w13.shape == (E, two_i, D // packed) and two_i % 2 == 0
    assert w2.shape == (E, D, I // packed) and all(t.is_contiguous() for t in (router, w13, w2))
    assert residual.shape == (T, D) and residual.stride(1) == 1
    assert (shared is None) == (shared_gate is None)
    assert shared is None or (shared.shape == (T, D) and shared.is_contiguous() and shared_gate.shape == (1, D))
    if out is None:
        out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    assert out.shape == (T, D) and out.stride(1) == 1
    meta = {"E": E, "D": D, "I": I, "top_k": top_k, "renormalize": renormalize, "stride_x": x.stride(0),
            "stride_residual": residual.stride(0), "stride_out": out.stride(0), "max_T": T, "max_S": 1,
            "T_bucket": T, "has_shared": shared is not None, **quant}
    tensors = {"x": x, "router": router, "w13": w13, "w2": w2, "residual": residual, "out": out, **(scratch or {})}
    if shared is not None:
        tensors |= {"shared": shared, "shared_gate": shared_gate}
    if quant:
        tensors |= {"w13_scale": w13_scale.contiguous(), "w2_scale": w2_scale.contiguous()}
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return out


def expert_weights(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """[E, N, K] fp32 expert weights from w as stored and its scale (None: w itself; else each expert's matrix
    dequantized as a linear's weight, kernels/weight_quant.py)."""
    if scale is None:
        return w.float()
    flat = dequantize(w.flatten(0, 1), scale.flatten(0, 1))
    return flat.reshape(w.shape[0], w.shape[1], -1)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D], router [E, D] -> (ids [T, top_k] int64, weights [T, top_k] fp32): softmax top-k from the maths."""
    logits = (x.float() @ router.float().T).to(x.dtype).float()
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def reference(x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, residual: torch.Tensor,
              shared: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None, *, top_k: int,
              renormalize: bool, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """residual + sum_k weights[:, k] * down(silu(gate) * up) of each token's chosen experts (+ sigmoid(x @
    shared_gate^T) * shared), in fp32 with the products rounded to x's dtype where the kernels (and HF) round them;
    cast to x's dtype. Quantized experts (w13_scale, w2_scale) compute with their dequantized fp32 weights."""
    ids, weights = route(x, router, top_k, renormalize)
    w13, w2 = expert_weights(w13, w13_scale), expert_weights(w2, w2_scale)
    I = w13.shape[1] // 2
    out = torch.zeros_like(residual, dtype=torch.float32)
    for e in ids.unique().tolist():
        t, k = torch.where(ids == e)
        gate_up = (x[t].float() @ w13[e].float().T).to(x.dtype).float()
        act = (torch.nn.functional.silu(gate_up[:, :I]) * gate_up[:, I:]).to(x.dtype).float()
        down = (act @ w2[e].float().T).to(x.dtype).float()
        out.index_add_(0, t, weights[t, k, None] * down)
    if shared is not None:
        gate = torch.sigmoid((x.float() @ shared_gate.float().T).to(x.dtype).float()).to(x.dtype).float()
        out = out.to(x.dtype).float() + (gate * shared.float()).to(x.dtype).float()
    return (out.to(x.dtype).float() + residual.float()).to(x.dtype)
