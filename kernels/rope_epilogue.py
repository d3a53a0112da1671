"""The rope epilogue of the qkv matmul (`linear`, `rms_norm_linear` with act "rope"): rotary embedding, and with
write_cache the KV-cache write, applied to the matmul's fp32 tile before it is stored, so kernels/rope.py needs no
launch of its own.

A rotation pair of kernels/rope.py, (x[i], x[i + Dr/2]) with neox pairing or (x[2i], x[2i + 1]) with GPT-J's,
becomes two adjacent output columns (2i, 2i + 1) of the matmul when the compiler reorders the q and k heads' weight
rows (and bias) by ``row_order``: within each q and k head, row 2i is the head's row i and row 2i + 1 its row
i + Dr/2 (neox; GPT-J pairs are adjacent already, so the order is the identity there). Pass-through columns
(Dr <= d < Dh, partial rotary) and the v heads keep their rows, so they too form adjacent (even, odd) pairs.
The epilogue splits the tile into its even and odd columns (one pair per lane, as the SwiGLU epilogue does),
recovers each pair's own columns in qkv from the permuted column index, rotates the q and k pairs with
cos_sin[positions[row]] in fp32, and stores every value at its own column: the qkv in memory is exactly what
kernels/rope.py writes, so attention and everything after it are unchanged. With write_cache each row whose
slot_mapping is >= 0 also stores its k heads (rotated) and v heads at that slot of k_cache / v_cache, the very
values written to qkv (one rounding).

BLOCK_N is even and every column tile starts at an even column (kernels/matmul_configs.py), so no pair straddles
two programs; head_dim is even, so no pair straddles two heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.rope import reference as rope_reference
from kernels.spec import Config, ptr

# The node attrs of the fused form (docs/ops.md), beside act "rope".
ROPE_ATTRS = ("num_q_heads", "num_kv_heads", "head_dim", "rotary_dim", "is_neox", "write_cache")
# The kernel's rope pointers and the roles they read; an unused one is bound to a tensor the node always has.
ROPE_POINTERS = {"positions_ptr": "positions", "cos_sin_ptr": "cos_sin", "slot_mapping_ptr": "slot_mapping",
                 "k_cache_ptr": "k_cache", "v_cache_ptr": "v_cache"}
# The rope constexprs of a variant without the epilogue: fixed values its branch never reads.
_NO_ROPE = {"HQ": 0, "HK": 0, "HEAD_DIM": 0, "ROT_DIM": 0, "IS_NEOX": False, "WRITE_CACHE": False}


@dataclass(frozen=True)
class RopeEpilogue:
    """The head layout and pairing of a fused rope: q heads, then k heads, then v heads, each head_dim wide."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    is_neox: bool
    write_cache: bool = False

    def __post_init__(self) -> None:
        if self.num_q_heads < 1 or self.num_kv_heads < 1:
            raise ValueError(f"rope epilogue: needs q and kv heads, got {self.num_q_heads} and {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rope epilogue: head_dim={self.head_dim} must be even (column pairs stay in one head)")
        if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rope epilogue: rotary_dim={self.rotary_dim} must be even and in "
                             f"(0, head_dim={self.head_dim}]")

    @staticmethod
    def from_attrs(attrs: dict) -> RopeEpilogue:
        """From a node's attrs or a plan's meta (write_cache absent = False)."""
        return RopeEpilogue(int(attrs["num_q_heads"]), int(attrs["num_kv_heads"]), int(attrs["head_dim"]),
                            int(attrs["rotary_dim"]), bool(attrs["is_neox"]), bool(attrs.get("write_cache", False)))

    def attrs(self) -> dict:
        return {k: getattr(self, k) for k in ROPE_ATTRS}

    @property
    def width(self) -> int:
        """Columns of qkv: (Hq + 2 Hk) * Dh."""
        return (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim

    def constexprs(self) -> dict:
        return {"HQ": self.num_q_heads, "HK": self.num_kv_heads, "HEAD_DIM": self.head_dim, "ROT_DIM": self.rotary_dim,
                "IS_NEOX": self.is_neox, "WRITE_CACHE": self.write_cache}

    def row_order(self) -> torch.Tensor:
        """[width] int64: the qkv row (of the weight, the bias, the output column) at each permuted position."""
        within = torch.arange(self.head_dim)
        if self.is_neox:
            half = torch.arange(self.rotary_dim // 2)
            within[:self.rotary_dim] = torch.stack([half, half + self.rotary_dim // 2], dim=1).flatten()
        qk = self.num_q_heads + self.num_kv_heads
        rotated = (torch.arange(qk)[:, None] * self.head_dim + within[None, :]).flatten()
        return torch.cat([rotated, torch.arange(qk * self.head_dim, self.width)])


def rope_launch_pieces(meta: dict, dtypes: dict, config: Config, unused: str) -> tuple[dict, dict, dict]:
    """(pointer types, argument bindings, constexprs) of the rope pointers for a matmul plan; without act "rope"
    (or without write_cache, for the cache pointers) they are bound to role ``unused`` and never read."""
    rope = RopeEpilogue.from_attrs(meta) if meta.get("act") == "rope" else None
    if rope is not None:
        if meta["N"] != rope.width:
            raise ValueError(f"rope epilogue: N={meta['N']} is not (Hq + 2 Hk) * Dh = {rope.width}")
        if config["BLOCK_N"] % 2:
            raise ValueError(f"rope epilogue: BLOCK_N={config['BLOCK_N']} must be even (column pairs)")
    used = {"positions", "cos_sin"} if rope else set()
    if rope and rope.write_cache:
        used |= {"slot_mapping", "k_cache", "v_cache"}
    roles = {p: r if r in used else unused for p, r in ROPE_POINTERS.items()}
    types = {p: ptr(dtypes[r]) for p, r in roles.items()}
    args = {p: ("tensor", r) for p, r in roles.items()}
    return types, args, {"ACT_ROPE": rope is not None, **(rope.constexprs() if rope else _NO_ROPE)}


def rope_inputs(rope: RopeEpilogue, T: int, positions: torch.Tensor | None, cos_sin: torch.Tensor | None,
                slot_mapping: torch.Tensor | None, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None
                ) -> dict[str, torch.Tensor]:
    """The launchers' rope tensors by role, checked: positions [T] i32, cos_sin [max_pos, Dr] fp32 contiguous; with
    write_cache slot_mapping [T] i32 and k_cache, v_cache [num_blocks, block_size, Hk, Dh] contiguous."""
    assert positions is not None and positions.shape == (T,) and positions.dtype == torch.int32
    assert cos_sin is not None and cos_sin.dim() == 2 and cos_sin.shape[1] == rope.rotary_dim
    assert cos_sin.dtype == torch.float32 and cos_sin.is_contiguous(), "cos_sin must be a contiguous fp32 table"
    tensors = {"positions": positions, "cos_sin": cos_sin}
    if rope.write_cache:
        assert slot_mapping is not None and slot_mapping.shape == (T,) and slot_mapping.dtype == torch.int32
        assert k_cache is not None and v_cache is not None and k_cache.shape == v_cache.shape
        assert k_cache.shape[2:] == (rope.num_kv_heads, rope.head_dim)
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        tensors |= {"slot_mapping": slot_mapping, "k_cache": k_cache, "v_cache": v_cache}
    return tensors


@triton.jit
def store_rotated(
    acc,  # [BLOCK_M, BLOCK_N] fp32: the matmul's finished tile (rstd, bias applied), columns in the permuted order
    rows,  # [BLOCK_M] int64
    cols,  # [BLOCK_N] int64, permuted columns; the first is even
    T,
    out_ptr,  # [T, (HQ + 2 * HK) * HEAD_DIM]: qkv in rope's layout
    stride_out,
    positions_ptr,  # [T] i32
    cos_sin_ptr,  # [max_pos, ROT_DIM] fp32: cos | sin
    slot_mapping_ptr,  # [T] i32, -1 = padding row; read only with WRITE_CACHE
    k_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM], written only with WRITE_CACHE
    v_cache_ptr,  # [num_blocks, block_size, HK, HEAD_DIM], written only with WRITE_CACHE
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    """Rotate the tile's q and k pairs and store every pair at its own two columns of qkv (and the caches)."""
    BN: tl.constexpr = acc.shape[1]
    if ROT_DIM == HEAD_DIM and BN % HEAD_DIM == 0:
        _store_whole_heads(acc, rows, cols, T, out_ptr, stride_out, positions_ptr, cos_sin_ptr, slot_mapping_ptr,
                           k_cache_ptr, v_cache_ptr, HQ=HQ, HK=HK, HEAD_DIM=HEAD_DIM, IS_NEOX=IS_NEOX,
                           WRITE_CACHE=WRITE_CACHE)
    else:
        _store_pairs(acc, rows, cols, T, out_ptr, stride_out, positions_ptr, cos_sin_ptr, slot_mapping_ptr,
                     k_cache_ptr, v_cache_ptr, HQ=HQ, HK=HK, HEAD_DIM=HEAD_DIM, ROT_DIM=ROT_DIM, IS_NEOX=IS_NEOX,
                     WRITE_CACHE=WRITE_CACHE)


@triton.jit
def _store_whole_heads(acc, rows, cols, T, out_ptr, stride_out, positions_ptr, cos_sin_ptr, slot_mapping_ptr,
                       k_cache_ptr, v_cache_ptr, HQ: tl.constexpr, HK: tl.constexpr, HEAD_DIM: tl.constexpr,
                       IS_NEOX: tl.constexpr, WRITE_CACHE: tl.constexpr):
    """store_rotated for a tile of whole heads, all of each rotated (BLOCK_N a multiple of head_dim, full rotary):
    the permuted pairs are put back in qkv order in registers, so each row's BLOCK_N values are stored (and cached)
    as one contiguous run, and a head's cos / sin row is loaded once for every head of the tile rather than per
    column."""
    BM: tl.constexpr = acc.shape[0]
    BN: tl.constexpr = acc.shape[1]
    HT: tl.constexpr = BN // HEAD_DIM
    HALF: tl.constexpr = HEAD_DIM // 2
    x1, x2 = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))  # [BM, BN / 2]: the pairs, HALF per head
    x1 = tl.reshape(x1, (BM, HT, HALF))
    x2 = tl.reshape(x2, (BM, HT, HALF))
    col0 = tl.min(cols, axis=0)  # the tile's first column, a multiple of HEAD_DIM
    heads = col0 // HEAD_DIM + tl.arange(0, HT)
    row_ok = rows < T
    pos = tl.load(positions_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    table = cos_sin_ptr + pos[:, None] * HEAD_DIM + tl.arange(0, HALF)[None, :]  # [BM, HALF]: pair i's frequency
    cos = tl.load(table, mask=row_ok[:, None], other=1.0)[:, None, :]
    sin = tl.load(table + HALF, mask=row_ok[:, None], other=0.0)[:, None, :]
    rotated = (heads < HQ + HK)[None, :, None]
    o1 = tl.where(rotated, x1 * cos - x2 * sin, x1)
    o2 = tl.where(rotated, x2 * cos + x1 * sin, x2)
    # GPT-J pairs, and the v heads' (never permuted), are the head's columns (2i, 2i + 1).
    tile = tl.reshape(tl.join(o1, o2), (BM, BN))
    N: tl.constexpr = (HQ + 2 * HK) * HEAD_DIM
    std = col0 + tl.arange(0, BN)  # qkv columns, in order
    if IS_NEOX:
        # A q or k head's pair i is its columns (i, i + HALF): the first halves, then the second ones.
        neox = tl.reshape(tl.permute(tl.join(o1, o2), (0, 1, 3, 2)), (BM, BN))
        tile = tl.where((std < (HQ + HK) * HEAD_DIM)[None, :], neox, tile)
    mask = row_ok[:, None] & (std < N)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + std[None, :], tile.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_CACHE:
        slot = tl.load(slot_mapping_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        head = std // HEAD_DIM
        is_k = (head >= HQ) & (head < HQ + HK)
        is_v = head >= HQ + HK
        within = tl.where(is_v, std - (HQ + HK) * HEAD_DIM, std - HQ * HEAD_DIM)  # kv head * HEAD_DIM + d
        dst = slot[:, None] * (HK * HEAD_DIM) + within[None, :]
        cached = mask & (slot >= 0)[:, None]
        tl.store(k_cache_ptr + dst, tile.to(k_cache_ptr.dtype.element_ty), mask=cached & is_k[None, :])
        tl.store(v_cache_ptr + dst, tile.to(v_cache_ptr.dtype.element_ty), mask=cached & is_v[None, :])


@triton.jit
def _store_pairs(acc, rows, cols, T, out_ptr, stride_out, positions_ptr, cos_sin_ptr, slot_mapping_ptr,
                 k_cache_ptr, v_cache_ptr, HQ: tl.constexpr, HK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 ROT_DIM: tl.constexpr, IS_NEOX: tl.constexpr, WRITE_CACHE: tl.constexpr):
    """store_rotated for any tile: each pair's two values stored at their own columns."""
    BM: tl.constexpr = acc.shape[0]
    BN: tl.constexpr = acc.shape[1]
    x1, x2 = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))  # [BM, BN / 2]: permuted columns 2p and 2p + 1
    even, _ = tl.split(tl.reshape(cols, (BN // 2, 2)))
    head = even // HEAD_DIM
    d = even % HEAD_DIM  # even: the pair is (d, d + 1) in the permuted head
    rotated = (head < HQ + HK) & (d < ROT_DIM)
    freq = d // 2  # the pair's frequency index, when rotated
    if IS_NEOX:
        # Permuted (2i, 2i + 1) of a q or k head hold its columns (i, i + ROT_DIM / 2) (RopeEpilogue.row_order).
        d1 = tl.where(rotated, freq, d)
        d2 = tl.where(rotated, freq + ROT_DIM // 2, d + 1)
    else:
        d1 = d
        d2 = d + 1
    row_ok = rows < T
    pos = tl.load(positions_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    table = cos_sin_ptr + pos[:, None] * ROT_DIM + freq[None, :]  # [BM, BN / 2]
    rot_ok = row_ok[:, None] & rotated[None, :]
    cos = tl.load(table, mask=rot_ok, other=1.0)
    sin = tl.load(table + ROT_DIM // 2, mask=rot_ok, other=0.0)
    # As kernels/rope.py: (x1 cos - x2 sin, x2 cos + x1 sin); pass-through and v pairs are stored as they are.
    o1 = tl.where(rot_ok, x1 * cos - x2 * sin, x1)
    o2 = tl.where(rot_ok, x2 * cos + x1 * sin, x2)
    N: tl.constexpr = (HQ + 2 * HK) * HEAD_DIM
    mask = row_ok[:, None] & (even < N)[None, :]
    col1 = (head * HEAD_DIM + d1)[None, :]
    col2 = (head * HEAD_DIM + d2)[None, :]
    out_rows = out_ptr + rows[:, None] * stride_out
    tl.store(out_rows + col1, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_rows + col2, o2.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_CACHE:
        # Cache row `slot` is [HK, HEAD_DIM] contiguous (as in kv_cache_write): kv head h starts at
        # slot * HK * HEAD_DIM + h * HEAD_DIM, whichever block the slot lies in.
        slot = tl.load(slot_mapping_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        is_k = (head >= HQ) & (head < HQ + HK)
        is_v = head >= HQ + HK
        kv_head = tl.where(is_v, head - HQ - HK, head - HQ)
        dst = slot[:, None] * (HK * HEAD_DIM) + (kv_head * HEAD_DIM)[None, :]  # [BM, BN / 2]
        cached = mask & (slot >= 0)[:, None]
        k_ok = cached & is_k[None, :]
        v_ok = cached & is_v[None, :]
        tl.store(k_cache_ptr + dst + d1[None, :], o1.to(k_cache_ptr.dtype.element_ty), mask=k_ok)
        tl.store(k_cache_ptr + dst + d2[None, :], o2.to(k_cache_ptr.dtype.element_ty), mask=k_ok)
        tl.store(v_cache_ptr + dst + d1[None, :], o1.to(v_cache_ptr.dtype.element_ty), mask=v_ok)
        tl.store(v_cache_ptr + dst + d2[None, :], o2.to(v_cache_ptr.dtype.element_ty), mask=v_ok)


def reference(y: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, slot_mapping: torch.Tensor | None,
              k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, rope: RopeEpilogue,
              dtype: torch.dtype) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The epilogue from its definition: y [T, width] (the matmul's output in fp32, permuted columns) back in qkv
    order, then kernels/rope.py's reference (rotation, and with write_cache the cache write) in fp32; qkv in
    ``dtype``. Returns qkv, or (qkv, k_cache, v_cache) with write_cache (the caches updated in place)."""
    qkv = torch.empty_like(y, dtype=torch.float32)
    qkv[:, rope.row_order()] = y.float()
    out = rope_reference(qkv, positions, cos_sin, None, None, slot_mapping, k_cache, v_cache,
                         num_q_heads=rope.num_q_heads, num_kv_heads=rope.num_kv_heads, head_dim=rope.head_dim,
                         rotary_dim=rope.rotary_dim, is_neox=rope.is_neox, write_cache=rope.write_cache)
    if rope.write_cache:
        return out[0].to(dtype), out[1], out[2]
    return out.to(dtype)
