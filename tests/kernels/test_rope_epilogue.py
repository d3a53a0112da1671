"""The rope epilogue of linear / rms_norm_linear (act "rope") against the maths written here: x @ W^T (with the
RMSNorm's rstd) + bias, then each q and k head rotated (rotate_half for neox, rotate_every_two for GPT-J) by the
cos/sin of its position, then the k and v heads stored at the row's slot of the paged caches.

The kernel gets W and bias with their rows in RopeEpilogue.row_order (what the compiler stores); the maths uses them
in their natural order. Outputs and caches are NaN-poisoned before the run: an element left unwritten fails, and a
cache slot that must stay untouched (padding rows, slot -1) must still be NaN afterwards.
"""

import pytest
import torch

from kernels import linear, rms_norm_linear
from kernels.matmul_configs import gemm, gemv
from kernels.rope_epilogue import RopeEpilogue
from tests.kernels.test_linear import assert_fits_shared_memory

OPS = {"linear": linear, "rms_norm_linear": rms_norm_linear}
# The layouts of tests/kernels/test_linear.py: one row per step, split-K (the last arriver runs the epilogue), the
# tl.dot GEMV with rows looped in blocks of 16, GEMM tiles, and the heuristic default.
CONFIGS = {
    "gemv1": gemv(1, 16, 32, 1, False),
    "gemv4_split3": gemv(4, 32, 16, 3, False),
    "gemv_dot_split2": gemv(16, 32, 32, 2, True),
    "gemm": gemm(32, 16, 32, 4),
    "default": None,
}
# (op, T, Hq, Hk, Dh, Dr, is_neox, use_bias, write_cache): a decode row of a Llama-like head layout; partial neox
# rotary over 12-wide heads, which 16- and 32-column tiles cut across; GPT-J pairing with partial rotary, MHA; many
# rows without the cache write. Tiles of whole fully rotated heads take store_rotated's whole-head path.
CASES = [
    ("rms_norm_linear", 1, 4, 2, 16, 16, True, True, True),
    ("linear", 5, 3, 1, 12, 6, True, False, True),
    ("rms_norm_linear", 7, 2, 2, 20, 8, False, True, True),
    ("linear", 37, 4, 2, 16, 16, True, True, False),
    ("rms_norm_linear", 3, 2, 1, 16, 16, False, False, True),  # GPT-J, full rotary: the whole-head store
]
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-3, 2e-3)]
K, EPS, MAX_POS, BLOCK_SIZE = 72, 1e-5, 97, 4


def _heads(Hq, Hk, Dh, Dr, is_neox, write_cache):
    return {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": Dh, "rotary_dim": Dr, "is_neox": is_neox,
            "write_cache": write_cache}


def _inputs(T, heads, dtype, use_bias, seed, k=K):
    g = torch.Generator().manual_seed(seed)
    Hq, Hk, Dh, Dr = (heads[n] for n in ("num_q_heads", "num_kv_heads", "head_dim", "rotary_dim"))
    N = (Hq + 2 * Hk) * Dh
    # Row scales and an offset, so rstd differs per row.
    x = (torch.randn(T, k, generator=g) * torch.rand(T, 1, generator=g) * 4 + 0.3).to(dtype)
    w = (torch.randn(N, k, generator=g) / k**0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if use_bias else None
    positions = torch.randint(1, MAX_POS, (T,), generator=g, dtype=torch.int32)
    angles = torch.arange(MAX_POS, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(0, Dr, 2) / Dr)[None]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1).contiguous()
    num_blocks = -(-2 * T // BLOCK_SIZE) + 1
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:T].to(torch.int32)
    slots[1::3] = -1  # padding rows, at position 0 as the runtime pads them
    positions[1::3] = 0
    cache = torch.full((num_blocks, BLOCK_SIZE, Hk, Dh), float("nan"), dtype=dtype)
    return x, w, bias, positions, cos_sin, slots, cache, cache.clone()


def _maths(x, w, bias, positions, cos_sin, slots, k_cache, v_cache, *, use_rms, num_q_heads, num_kv_heads,
           head_dim, rotary_dim, is_neox, write_cache):
    """qkv [T, N] in fp64 and the caches it leaves, from the definitions (HF's rotate_half / rotate_every_two)."""
    T, Hq, Hk, Dh, half = x.shape[0], num_q_heads, num_kv_heads, head_dim, rotary_dim // 2
    xd = x.double()
    y = xd @ w.double().T
    if use_rms:
        y = y * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS)
    if bias is not None:
        y = y + bias.double()
    heads = y.view(T, Hq + 2 * Hk, Dh).clone()
    cos, sin = (c[:, None, :] for c in cos_sin.double()[positions.long()].chunk(2, dim=1))  # [T, 1, Dr/2]
    qk = heads[:, :Hq + Hk, :rotary_dim]
    if is_neox:
        x1, x2 = qk[..., :half], qk[..., half:]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = qk[..., 0::2], qk[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    heads[:, :Hq + Hk, :rotary_dim] = rotated
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    if write_cache:
        for t, slot in enumerate(slots.tolist()):
            if slot >= 0:
                block, offset = divmod(slot, k_cache.shape[1])
                k_cache[block, offset] = heads[t, Hq:Hq + Hk].to(k_cache.dtype)
                v_cache[block, offset] = heads[t, Hq + Hk:].to(v_cache.dtype)
    return heads.flatten(1), k_cache, v_cache


def _run(op, T, heads, dtype, use_bias, config, seed, k=K):
    """(kernel qkv, kernel caches, maths qkv, maths caches, slots)."""
    x, w, bias, positions, cos_sin, slots, k_cache, v_cache = _inputs(T, heads, dtype, use_bias, seed, k)
    order = RopeEpilogue.from_attrs(heads).row_order()
    w_perm, bias_perm = w[order].contiguous(), None if bias is None else bias[order]
    want, k_want, v_want = _maths(x, w, bias, positions, cos_sin, slots, k_cache, v_cache,
                                  use_rms=op == "rms_norm_linear", **heads)
    out = torch.full((T, w.shape[0]), float("nan"), dtype=dtype)
    kw = {"eps": EPS} if op == "rms_norm_linear" else {}
    args = (x, w_perm, bias_perm) if op == "rms_norm_linear" else (x, w_perm, bias_perm, None)
    got = getattr(OPS[op], op)(*args, positions, cos_sin, slots, k_cache, v_cache, act="rope", **heads, **kw,
                                 out=out, config=config)
    if heads["write_cache"]:
        assert got[0] is out and got[1] is k_cache and got[2] is v_cache
    else:
        assert got is out
    return out, k_cache, v_cache, want, k_want, v_want, slots


def _check(out, k_cache, v_cache, want, k_want, v_want, slots, heads, atol, rtol):
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(k_cache, k_want, atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(v_cache, v_want, atol=atol, rtol=rtol, equal_nan=True)
    Hq, Hk, Dh = heads["num_q_heads"], heads["num_kv_heads"], heads["head_dim"]
    written = (slots >= 0).sum().item() * Hk * Dh if heads["write_cache"] else 0
    assert (~k_cache.isnan()).sum().item() == written == (~v_cache.isnan()).sum().item()
    # The caches hold the very values written to qkv (one rounding, shared).
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0 and heads["write_cache"]:
            b, o = divmod(slot, BLOCK_SIZE)
            assert torch.equal(k_cache[b, o].flatten(), out[t, Hq * Dh:(Hq + Hk) * Dh])
            assert torch.equal(v_cache[b, o].flatten(), out[t, (Hq + Hk) * Dh:])


# One row per step is the layout for T <= 4; many-row cases only make that config slow in the interpreter.
LAYOUT_CASES = [(name, *case) for name in CONFIGS for case in CASES if name != "gemv1" or case[1] <= 16]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("name,op,T,Hq,Hk,Dh,Dr,is_neox,use_bias,write_cache", LAYOUT_CASES)
def test_rope_epilogue_matches_the_maths(name, op, T, Hq, Hk, Dh, Dr, is_neox, use_bias, write_cache, dtype, atol,
                                         rtol):
    heads = _heads(Hq, Hk, Dh, Dr, is_neox, write_cache)
    result = _run(op, T, heads, dtype, use_bias, CONFIGS[name], seed=T * 7 + Dh * 13 + Dr)
    _check(*result, heads, atol, rtol)


@pytest.mark.parametrize("name", ["gemv1", "gemv4_split3"])
def test_rope_epilogue_bf16_without_dot(name):
    # tl.dot on bf16 is wrong in the interpreter; the broadcast-product GEMV is not, so bf16 is checked here.
    heads = _heads(3, 1, 12, 6, True, True)
    _check(*_run("rms_norm_linear", 4, heads, torch.bfloat16, True, CONFIGS[name], seed=9), heads, 3e-2, 3e-2)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("bucket", [1, 3, 16, 64, 256])
def test_rope_epilogue_every_candidate_config(bucket, dtype, atol, rtol):
    # K of 512 so the split-K candidates really split; 60 columns of 12-wide heads leave a partial column tile and
    # tiles that cut across heads in every layout.
    T, k = (bucket if bucket < 64 else bucket - 5), 512
    heads = _heads(3, 1, 12, 6, True, True)
    meta = {"K": k, "N": 60, "eps": EPS, "has_bias": True, "act": "rope", **heads, "max_T": T, "max_S": 1,
            "T_bucket": bucket}
    cands = rms_norm_linear.configs(meta)
    assert bucket > 4 or any(c["SPLIT_K"] > 1 for c in cands)
    for config in cands:
        result = _run("rms_norm_linear", T, heads, dtype, True, config, seed=bucket, k=k)
        _check(*result, heads, atol, rtol)


@pytest.mark.parametrize("op,T,Hq,Hk,Dh,Dr,is_neox,use_bias,write_cache", CASES)
def test_reference_matches_the_maths(op, T, Hq, Hk, Dh, Dr, is_neox, use_bias, write_cache):
    # The torch backend runs the fused node through these references.
    heads = _heads(Hq, Hk, Dh, Dr, is_neox, write_cache)
    x, w, bias, positions, cos_sin, slots, k_cache, v_cache = _inputs(T, heads, torch.float32, use_bias, seed=T)
    order = RopeEpilogue.from_attrs(heads).row_order()
    want = _maths(x, w, bias, positions, cos_sin, slots, k_cache, v_cache, use_rms=op == "rms_norm_linear", **heads)
    kw = {"eps": EPS} if op == "rms_norm_linear" else {}
    got = OPS[op].reference(x, w[order], None if bias is None else bias[order], positions=positions, cos_sin=cos_sin,
                            slot_mapping=slots, k_cache=k_cache, v_cache=v_cache, act="rope", **heads, **kw)
    got = got if write_cache else (got, k_cache, v_cache)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, equal_nan=True)


def test_row_order_pairs_each_rotation():
    # One q and one k head of 6 columns, rotary 4: neox pairs (0, 2), (1, 3) become rows (0, 1), (2, 3); the
    # pass-through columns 4, 5 and the v head keep their rows. GPT-J pairs are adjacent already.
    neox = RopeEpilogue(1, 1, 6, 4, True).row_order().tolist()
    assert neox == [0, 2, 1, 3, 4, 5, 6, 8, 7, 9, 10, 11, *range(12, 18)]
    assert RopeEpilogue(1, 1, 6, 4, False).row_order().tolist() == list(range(18))


@pytest.mark.parametrize("bucket", [1, 3, 16, 64, 2048])
def test_every_config_keeps_pairs_in_one_program(bucket):
    meta = {"K": 2048, "N": 2560, "eps": EPS, "has_bias": False, "act": "rope", **_heads(32, 4, 64, 64, True, True),
            "max_T": 2048, "max_S": 32, "T_bucket": bucket}
    for op in OPS.values():
        meta = {**meta, "has_residual": False}
        assert all(c["BLOCK_N"] % 2 == 0 for c in [*op.configs(meta), op.default(meta)])


def test_plan_refuses_what_the_epilogue_cannot_do():
    heads = _heads(4, 2, 16, 16, True, True)
    meta = {"K": 64, "N": 128, "eps": EPS, "has_bias": False, "has_residual": False, "act": "rope", **heads,
            "max_T": 8, "max_S": 1, "T_bucket": 1}
    dtypes = {"x": "fp16", "w": "fp16", "out": "fp16", "residual": "fp16", "positions": "i32", "cos_sin": "fp32",
              "slot_mapping": "i32", "k_cache": "fp16", "v_cache": "fp16"}
    (launch,) = rms_norm_linear.SPEC.plan(meta, dtypes, gemv(1, 4, 64, 1, False)).launches
    constexprs, args = dict(launch.constexprs), dict(launch.args)
    assert constexprs["ACT_ROPE"] is True and constexprs["ACT_SILU_MUL"] is False and constexprs["WRITE_CACHE"]
    assert args["k_cache_ptr"] == ("tensor", "k_cache") and args["positions_ptr"] == ("tensor", "positions")
    with pytest.raises(ValueError, match="BLOCK_N=1"):
        rms_norm_linear.SPEC.plan(meta, dtypes, gemv(1, 1, 64, 1, False))
    with pytest.raises(ValueError, match="N=120"):
        rms_norm_linear.SPEC.plan({**meta, "N": 120}, dtypes, gemv(1, 4, 64, 1, False))
    with pytest.raises(ValueError, match="residual"):
        linear.SPEC.plan({**meta, "has_residual": True}, dtypes, gemv(1, 4, 64, 1, False))
    with pytest.raises(ValueError, match="head_dim=15"):
        RopeEpilogue(1, 1, 15, 8, True)
    # Without write_cache the cache pointers are bound to out and never written.
    (plain,) = linear.SPEC.plan({**meta, "write_cache": False}, dtypes, gemv(1, 4, 64, 1, False)).launches
    assert dict(plain.args)["k_cache_ptr"] == ("tensor", "out") and not dict(plain.constexprs)["WRITE_CACHE"]


# TinyLlama's qkv (32 q heads, 4 kv heads of 64) through rms_norm_linear; Qwen2-0.5B's (14 and 2, with a bias)
# through linear, the form a qkv with no norm to fold takes.
TINYLLAMA = {"K": 2048, "N": 2560, "eps": 1e-5, "has_bias": False, "act": "rope", **_heads(32, 4, 64, 64, True, True)}
QWEN2 = {"K": 896, "N": 1152, "has_bias": True, "has_residual": False, "act": "rope",
         **_heads(14, 2, 64, 64, True, True)}


@pytest.mark.parametrize("op,base,dtype,bucket", [
    (rms_norm_linear, TINYLLAMA, "bf16", 1), (rms_norm_linear, TINYLLAMA, "fp16", 16),
    (rms_norm_linear, TINYLLAMA, "bf16", 2048), (rms_norm_linear, TINYLLAMA, "fp32", 2048),
    (linear, QWEN2, "bf16", 1), (linear, QWEN2, "bf16", 2048),
], ids=["rnl-bf16-1", "rnl-fp16-16", "rnl-bf16-2048", "rnl-fp32-2048", "linear-bf16-1", "linear-bf16-2048"])
def test_rope_epilogue_cross_compiles(op, base, dtype, bucket):
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {**base, "max_T": 2048, "max_S": 32, "T_bucket": bucket}
    dtypes = {"x": dtype, "w": dtype, "bias": dtype, "out": dtype, "positions": "i32", "cos_sin": "fp32",
              "slot_mapping": "i32", "k_cache": dtype, "v_cache": dtype}
    assert assert_cross_compiles(op.SPEC, meta, dtypes) >= 3
    assert_fits_shared_memory(op.SPEC, meta, dtypes)
