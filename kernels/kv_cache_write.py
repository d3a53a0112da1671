"""KV-cache write: scatter each token's k and v heads into the paged cache at its slot.

qkv rows hold q heads, then k heads, then v heads (docs/ops.md), so a token's k is one contiguous run of
Hk * Dh values starting at column Hq * Dh, and v follows it directly. The cache [num_blocks, block_size,
Hk, Dh] is contiguous, so slot = block * block_size + offset addresses its [Hk, Dh] row as slot * Hk * Dh:
the copy is one contiguous run per token on both sides, and block_size never enters the address.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run


@triton.jit
def _kv_cache_write_kernel(
    qkv_ptr,  # [T, (Hq + 2 * Hk) * Dh]
    slot_mapping_ptr,  # [T] i32, -1 = padding row
    k_cache_ptr,  # [num_blocks, block_size, Hk, Dh]
    v_cache_ptr,  # [num_blocks, block_size, Hk, Dh]
    stride_qkv,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    width = NUM_KV_HEADS * HEAD_DIM
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    src = qkv_ptr + token * stride_qkv + NUM_Q_HEADS * HEAD_DIM + cols
    k = tl.load(src, mask=mask)
    v = tl.load(src + width, mask=mask)
    tl.store(k_cache_ptr + slot * width + cols, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * width + cols, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _width(meta: dict) -> int:
    return meta["num_kv_heads"] * meta["head_dim"]


def configs(meta: dict) -> list[Config]:
    top = max(triton.next_power_of_2(_width(meta)), 256)
    return [Config.make(num_warps=w, num_stages=1, BLOCK=b) for b, w in ((256, 1), (512, 2), (1024, 4), (2048, 8))
            if b <= top]


def default(meta: dict) -> Config:
    # 8 elements (16 bytes of fp16) per thread, at most 4 warps per program; wide rows take several programs.
    block = min(triton.next_power_of_2(_width(meta)), 1024)
    return Config.make(num_warps=max(1, block // 256), num_stages=1, BLOCK=block)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    hq, hk, dh = meta["num_q_heads"], meta["num_kv_heads"], meta["head_dim"]
    block = config["BLOCK"]
    launch = make_launch(
        _kv_cache_write_kernel,
        types={"qkv_ptr": ptr(dtypes["qkv"]), "slot_mapping_ptr": ptr(dtypes["slot_mapping"]),
               "k_cache_ptr": ptr(dtypes["k_cache"]), "v_cache_ptr": ptr(dtypes["v_cache"]), "stride_qkv": "i64"},
        constexprs={"NUM_Q_HEADS": hq, "NUM_KV_HEADS": hk, "HEAD_DIM": dh, "BLOCK": block},
        args={"qkv_ptr": ("tensor", "qkv"), "slot_mapping_ptr": ("tensor", "slot_mapping"),
              "k_cache_ptr": ("tensor", "k_cache"), "v_cache_ptr": ("tensor", "v_cache"),
              "stride_qkv": ("int", (hq + 2 * hk) * dh)},
        grid=[grid_dim(("T", 1, 1)), grid_dim(-(-hk * dh // block))],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("kv_cache_write", configs, default, plan)


def kv_cache_write(qkv: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                   num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                   config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, (Hq + 2Hk) * Dh], slot_mapping [T] i32 -> k_cache, v_cache [num_blocks, block_size, Hk, Dh], in place."""
    T = qkv.shape[0]
    shape = (k_cache.shape[0], block_size, num_kv_heads, head_dim)
    assert qkv.shape == (T, (num_q_heads + 2 * num_kv_heads) * head_dim) and qkv.is_contiguous()
    assert slot_mapping.shape == (T,) and slot_mapping.dtype == torch.int32
    assert k_cache.shape == shape and v_cache.shape == shape and k_cache.is_contiguous() and v_cache.is_contiguous()
    meta = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
            "block_size": block_size, "max_T": T, "max_S": 1}
    tensors = {"qkv": qkv, "slot_mapping": slot_mapping, "k_cache": k_cache, "v_cache": v_cache}
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": T, "S": 1})
    return k_cache, v_cache


def reference(qkv: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
              num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write qkv's k and v heads of every token with slot >= 0 to cache row `slot`; returns the caches."""
    hq, hk, dh = num_q_heads, num_kv_heads, head_dim
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    rows = qkv[keep]
    k_cache.view(-1, hk, dh)[slots] = rows[:, hq * dh:(hq + hk) * dh].reshape(-1, hk, dh).to(k_cache.dtype)
    v_cache.view(-1, hk, dh)[slots] = rows[:, (hq + hk) * dh:].reshape(-1, hk, dh).to(v_cache.dtype)
    return k_cache, v_cache
