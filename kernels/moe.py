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
from kernels.matmul_configs import t_bucket
from kernels.spec import Config, KernelSpec, Launch, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,  # [T, D]
    w13_ptr,  # [E, 2 * I, D]: gate rows, then up rows
    ids_ptr,  # [T, TOP_K] i32
    act_ptr,  # [T, TOP_K * I]: row t, columns k * I + j: silu(gate_j) * up_j of choice k
    T,
    stride_x,
    D: tl.constexpr,
    I: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)  # t * TOP_K + k
    t = pair // TOP_K
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < I
    gate_ptr = w13_ptr + expert * (2 * I * D) + rows[:, None].to(tl.int64) * D
    up_ptr = gate_ptr + I * D
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_mask = cols < D
        x = tl.load(x_ptr + t * stride_x + cols, mask=k_mask, other=0.0).to(tl.float32)
        mask = n_mask[:, None] & k_mask[None, :]
        wg = tl.load(gate_ptr + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        wu = tl.load(up_ptr + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        acc_gate += tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
        acc_up += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
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
    w2_ptr,  # [E, D, I]; with FROM_Y bound to src and never read
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
):
    t = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < D
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        weight = tl.load(weights_ptr + t * TOP_K + k)
        if FROM_Y:
            part = tl.load(src_ptr + (t * TOP_K + k) * D + rows, mask=n_mask, other=0.0).to(tl.float32)
        else:
            expert = tl.load(ids_ptr + t * TOP_K + k).to(tl.int64)
            w_ptr = w2_ptr + expert * (D * I) + rows[:, None].to(tl.int64) * I
            part = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                k_mask = cols < I
                a = tl.load(src_ptr + (t * TOP_K + k) * I + cols, mask=k_mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + cols[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                            eviction_policy="evict_first")
                part += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
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
    gate_up = make_launch(
        _moe_gate_up_kernel,
        types={"x_ptr": ptr(dtypes["x"]), "w13_ptr": ptr(dtypes["w13"]), "ids_ptr": "*i32",
               "act_ptr": ptr(dtypes["out"]), "T": "i32", "stride_x": "i64"},
        constexprs={"D": D, "I": I, "TOP_K": top_k, "BLOCK_N": bn, "BLOCK_K": bk},
        args={"x_ptr": ("tensor", "x"), "w13_ptr": ("tensor", "w13"), "ids_ptr": ("tensor", "topk_ids"),
              "act_ptr": ("tensor", "act"), "T": ("sym", "T"), "stride_x": ("int", meta.get("stride_x", D))},
        grid=[grid_dim(("T", 1, top_k)), grid_dim(-(-I // bn))], config=config)
    return Plan((router, gate_up, _down(meta, dtypes, config, from_y=False)), scratch=scratch)


def _down(meta: dict, dtypes: dict, config: Config, from_y: bool) -> Launch:
    """The down kernel's launch: the GEMVs over w2, or (from_y) the grouped form's combine of y."""
    D, I, top_k = meta["D"], meta["I"], meta["top_k"]
    bn = config["BLOCK_N"]
    src, w2, ids = ("y", "y", "topk_weights") if from_y else ("act", "w2", "topk_ids")
    shared_types, shared_args, shared_constexprs = shared_pieces(meta, dtypes)
    return make_launch(
        _moe_down_kernel,
        types={"src_ptr": ptr(dtypes["out"]), "w2_ptr": ptr(dtypes["out"] if from_y else dtypes["w2"]),
               "ids_ptr": "*fp32" if from_y else "*i32", "weights_ptr": "*fp32", **shared_types,
               "residual_ptr": ptr(dtypes["residual"]), "out_ptr": ptr(dtypes["out"]), "T": "i32",
               "stride_res": "i64", "stride_out": "i64"},
        constexprs={"D": D, "I": I, "TOP_K": top_k, "BLOCK_N": bn, "BLOCK_K": config["BLOCK_K"], **shared_constexprs,
                    "FROM_Y": from_y},
        args={"src_ptr": ("tensor", src), "w2_ptr": ("tensor", w2), "ids_ptr": ("tensor", ids),
              "weights_ptr": ("tensor", "topk_weights"), **shared_args, "residual_ptr": ("tensor", "residual"),
              "out_ptr": ("tensor", "out"), "T": ("sym", "T"), "stride_res": ("int", meta.get("stride_residual", D)),
              "stride_out": ("int", meta.get("stride_out", D))},
        grid=[grid_dim(("T", 1, 1)), grid_dim(-(-D // bn))], config=config)


SPEC = KernelSpec("moe", configs, default, plan, tune_buckets=(1, 16, 64, 256))


def moe(x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, residual: torch.Tensor,
        shared: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None, *, top_k: int,
        renormalize: bool, out: torch.Tensor | None = None, config: Config | None = None,
        scratch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, D], router [E, D], w13 [E, 2I, D], w2 [E, D, I], residual [T, D] -> out [T, D] in x's dtype; with
    shared [T, D] (the shared expert's output) and shared_gate [1, D], sigmoid(x @ shared_gate^T) * shared is added.

    Runs the kernels (interpreter on CPU tensors); ``scratch`` may hold the act / topk_ids / topk_weights buffers
    (a test reads the routing from them).
    """
    T, D = x.shape
    E, two_i, _ = w13.shape
    assert x.stride(1) == 1 and router.shape == (E, D) and w13.shape == (E, two_i, D) and two_i % 2 == 0
    assert w2.shape == (E, D, two_i // 2) and all(t.is_contiguous() for t in (router, w13, w2))
    assert residual.shape == (T, D) and residual.stride(1) == 1
    assert (shared is None) == (shared_gate is None)
    assert shared is None or (shared.shape == (T, D) and shared.is_contiguous() and shared_gate.shape == (1, D))
    if out is None:
        out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    assert out.shape == (T, D) and out.stride(1) == 1
    meta = {"E": E, "D": D, "I": two_i // 2, "top_k": top_k, "renormalize": renormalize, "stride_x": x.stride(0),
            "stride_residual": residual.stride(0), "stride_out": out.stride(0), "max_T": T, "max_S": 1,
            "T_bucket": T, "has_shared": shared is not None}
    tensors = {"x": x, "router": router, "w13": w13, "w2": w2, "residual": residual, "out": out, **(scratch or {})}
    if shared is not None:
        tensors |= {"shared": shared, "shared_gate": shared_gate}
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return out


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
              renormalize: bool) -> torch.Tensor:
    """residual + sum_k weights[:, k] * down(silu(gate) * up) of each token's chosen experts (+ sigmoid(x @
    shared_gate^T) * shared), in fp32 with the products rounded to x's dtype where the kernels (and HF) round them;
    cast to x's dtype."""
    ids, weights = route(x, router, top_k, renormalize)
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
