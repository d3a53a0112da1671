"""linear, rms_norm_linear and logits on the GPU (Triton JIT) against their fp32 references at model sizes.

Tolerances: the kernels and the references both accumulate in fp32 from the same operands, so they differ by
summation order (~1e-6 relative in fp32) plus the final rounding of the output: bf16 keeps 8 mantissa bits
(one rounding step is 2^-8 ~ 4e-3 relative, two steps apart at a rounding boundary 8e-3), fp16 keeps 11
(~1e-3 relative). Outputs are O(1) by construction (activations scaled by 1/sqrt(K)), so atol matches rtol.
fp32 runs tl.dot with input_precision="ieee", and torch's fp32 matmul does not use TF32 by default.
"""

import pytest
import torch

from kernels import linear as linear_op
from kernels import logits as logits_op
from kernels import rms_norm_linear as rnl_op

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-4}
# (K, N): attention o-proj / qkv / gate_up / down of hidden 2048 (intermediate 5632) and 4096 (14336).
SHAPES = [(2048, 2048), (2048, 2 * 5632), (5632, 2048), (4096, 6144), (14336, 4096)]
TOKENS = [1, 3, 16, 64, 300]


def _rand(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def _poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _close(out, ref, dtype):
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("T", TOKENS)
def test_linear_gpu(T, K, N, dtype):
    x = _rand(T, K, dtype=dtype, scale=K**-0.5, seed=1)
    w, bias = _rand(N, K, dtype=dtype, seed=2), _rand(N, dtype=dtype, seed=3)
    residual = _rand(T, N, dtype=dtype, seed=4)
    expected = linear_op.reference(x, w, bias, residual)
    _close(linear_op.linear(x, w, bias, residual, out=_poisoned(T, N, dtype=dtype)), expected, dtype)
    _close(linear_op.linear(x, w, out=_poisoned(T, N, dtype=dtype)), linear_op.reference(x, w), dtype)
    # The in-place residual add of the o and down projections.
    assert linear_op.linear(x, w, bias, residual, out=residual) is residual
    _close(residual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K,N", SHAPES[:3])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("use_bias", [False, True])
def test_rms_norm_linear_gpu(use_bias, T, K, N, dtype):
    x = _rand(T, K, dtype=dtype, seed=5) + 0.1
    w = _rand(N, K, dtype=dtype, scale=K**-0.5, seed=6)
    bias = _rand(N, dtype=dtype, seed=7) if use_bias else None
    out = rnl_op.rms_norm_linear(x, w, bias, eps=1e-5, out=_poisoned(T, N, dtype=dtype))
    _close(out, rnl_op.reference(x, w, bias, eps=1e-5), dtype)


@pytest.mark.parametrize("op", ["linear", "rms_norm_linear"])
@pytest.mark.parametrize("bucket", [1, 16, 64, 1024])
def test_every_candidate_config_gpu(op, bucket):
    # What autotuning may pick must be right too: every candidate of each bucket, in bf16 (tensor-core dots).
    K, N, dtype = 4096, 2 * 5632, torch.bfloat16
    T = max(1, bucket - 3)
    x = _rand(T, K, dtype=dtype, scale=K**-0.5, seed=8) + 0.01
    w, bias = _rand(N, K, dtype=dtype, seed=9), _rand(N, dtype=dtype, seed=10)
    mod = linear_op if op == "linear" else rnl_op
    attrs = {"has_residual": False} if op == "linear" else {"eps": 1e-5}
    meta = {"K": K, "N": N, "has_bias": True, **attrs, "max_T": T, "max_S": 1, "T_bucket": bucket}
    if op == "linear":
        run = lambda config: linear_op.linear(x, w, bias, out=_poisoned(T, N, dtype=dtype), config=config)
        ref = linear_op.reference(x, w, bias)
    else:
        run = lambda config: rnl_op.rms_norm_linear(x, w, bias, eps=1e-5, out=_poisoned(T, N, dtype=dtype),
                                                    config=config)
        ref = rnl_op.reference(x, w, bias, eps=1e-5)
    for config in dict.fromkeys([*mod.SPEC.configs(meta), mod.SPEC.default(meta)]):
        torch.testing.assert_close(run(config).float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype],
                                   msg=lambda m, c=config: f"{c}: {m}")


@pytest.mark.parametrize("act", ["silu_mul", "gelu_tanh_mul"])
@pytest.mark.parametrize("bucket", [1, 16, 64, 1024])
def test_rms_norm_linear_swiglu_every_config_gpu(bucket, act):
    # The fused gate_up + SwiGLU (GeGLU) epilogue in bf16, every candidate (split-K reduce included): out [T, I]
    # against silu (gelu_tanh) times up of the unfused reference over the plain [gate; up] weight. act(g) * u of
    # O(1) values stays O(1) and the kernel rounds only the final output, so TOL holds; the reference runs in fp32.
    K, I, dtype = 2048, 5632, torch.bfloat16
    T = max(1, bucket - 3)
    x = _rand(T, K, dtype=dtype, seed=11) + 0.1
    w = _rand(2 * I, K, dtype=dtype, scale=K**-0.5, seed=12)
    w_inter = torch.stack(w.chunk(2, dim=0), dim=1).flatten(0, 1).contiguous()  # row 2j gate_j, 2j + 1 up_j
    gate_up = rnl_op.reference(x.float(), w.float(), eps=1e-5)
    gate = gate_up[:, :I]
    gated = torch.nn.functional.silu(gate) if act == "silu_mul" else torch.nn.functional.gelu(gate, approximate="tanh")
    ref = gated * gate_up[:, I:]
    meta = {"K": K, "N": 2 * I, "has_bias": False, "eps": 1e-5, "act": act, "max_T": T, "max_S": 1,
            "T_bucket": bucket}
    for config in dict.fromkeys([*rnl_op.SPEC.configs(meta), rnl_op.SPEC.default(meta)]):
        out = rnl_op.rms_norm_linear(x, w_inter, eps=1e-5, act=act, out=_poisoned(T, I, dtype=dtype),
                                     config=config)
        torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype],
                                   msg=lambda m, c=config: f"{c}: {m}")


# The qkv matmul with the rope and KV-cache write epilogue: TinyLlama's heads through rms_norm_linear, Qwen2-0.5B's
# (with a bias) through linear. (op, K, Hq, Hk, Dh, bias)
ROPE_QKV = {"tinyllama": ("rms_norm_linear", 2048, 32, 4, 64, False), "qwen2": ("linear", 896, 14, 2, 64, True)}


def rope_epilogue_case(name: str, T: int, dtype: torch.dtype, config, device: str = "cuda"):
    """(kernel out, k_cache, v_cache), (reference out, k_cache, v_cache), slots of one run of the fused qkv op in
    ``config``: the reference in fp32 from the same operands, the caches NaN-poisoned, every third row padding."""
    op, K, Hq, Hk, Dh, has_bias = ROPE_QKV[name]
    mod = rnl_op if op == "rms_norm_linear" else linear_op
    g = torch.Generator(device=device).manual_seed(T)
    N, blocks, max_pos = (Hq + 2 * Hk) * Dh, T // 4 + 2, 4096
    x = (torch.randn(T, K, generator=g, device=device) * (1 if op == "rms_norm_linear" else K**-0.5) + 0.1)
    w = torch.randn(N, K, generator=g, device=device) * (K**-0.5 if op == "rms_norm_linear" else 1)
    bias = torch.randn(N, generator=g, device=device) if has_bias else None
    angles = torch.rand(max_pos, Dh // 2, generator=g, device=device) * 6.3
    rope = {"positions": torch.randint(0, max_pos, (T,), generator=g, device=device, dtype=torch.int32),
            "cos_sin": torch.cat([angles.cos(), angles.sin()], dim=1).contiguous(),
            "slot_mapping": torch.randperm(blocks * 16, generator=g, device=device)[:T].to(torch.int32)}
    rope["slot_mapping"][1::3] = -1
    attrs = {"act": "rope", "num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": Dh, "rotary_dim": Dh,
             "is_neox": True, "write_cache": True, **({"eps": 1e-5} if op == "rms_norm_linear" else {})}
    caches = lambda dt: [torch.full((blocks, 16, Hk, Dh), float("nan"), dtype=dt, device=device) for _ in "kv"]
    x, w, bias = x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype)
    args = (x, w, bias) if op == "rms_norm_linear" else (x, w, bias, None)
    ref = mod.reference(x.float(), w.float(), None if bias is None else bias.float(), **rope,
                        **dict(zip(("k_cache", "v_cache"), caches(torch.float32))), **attrs)
    got = getattr(mod, op)(*args, **rope, **dict(zip(("k_cache", "v_cache"), caches(dtype))), **attrs,
                           out=torch.full((T, N), float("nan"), dtype=dtype, device=device), config=config)
    return got, ref, rope["slot_mapping"]


@pytest.mark.parametrize("name,bucket", [("tinyllama", 1), ("tinyllama", 16), ("tinyllama", 64),
                                         ("tinyllama", 1024), ("qwen2", 1), ("qwen2", 1024)])
def test_rope_epilogue_every_config_gpu(name, bucket):
    # Every candidate (split-K reduce, tl.dot GEMVs, GEMM tiles) in bf16: qkv rotated as rope leaves it, and the k and
    # v heads of the rows with a slot in the caches. Rotations keep magnitudes, so TOL of the plain matmul holds.
    op, K, Hq, Hk, Dh, has_bias = ROPE_QKV[name]
    T, dtype = max(1, bucket - 3), torch.bfloat16
    meta = {"K": K, "N": (Hq + 2 * Hk) * Dh, "has_bias": has_bias, "has_residual": False, "eps": 1e-5, "act": "rope",
            "num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": Dh, "rotary_dim": Dh, "is_neox": True,
            "write_cache": True, "max_T": T, "max_S": 1, "T_bucket": bucket}
    spec = (rnl_op if op == "rms_norm_linear" else linear_op).SPEC
    for config in dict.fromkeys([*spec.configs(meta), spec.default(meta)]):
        got, ref, slots = rope_epilogue_case(name, T, dtype, config)
        for a, b in zip(got, ref):  # NaN where no row was written: the padding rows' and unused slots
            torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True,
                                       msg=lambda m, c=config: f"{c}: {m}")
        assert (~got[1].isnan()).sum().item() == (slots >= 0).sum().item() * Hk * Dh


def _logits_inputs(T, D, V, R, dtype, seed):
    x = _rand(T, D, dtype=dtype, seed=seed) * 2
    norm_w = 1 + _rand(D, dtype=dtype, scale=0.1, seed=seed + 1)
    weight = _rand(V, D, dtype=dtype, scale=D**-0.5, seed=seed + 2)
    last_idx = torch.randperm(T, generator=torch.Generator().manual_seed(seed))[:R]
    return x, norm_w, weight, last_idx.to(device="cuda", dtype=torch.int32)


# logits (fp32 out): from 2 rows up the kernel rounds the normed activation to the weight dtype for the tensor
# cores, as HF's lm_head input is. One rounding per term (relative <= 2^-8 in bf16, 2^-11 in fp16) averages over
# the D terms of an O(1) logit to ~1.7e-3 (bf16) / 2e-4 (fp16) typical, ~9e-3 / 1.1e-3 at the tail of the
# 8M logits of R = 64, V = 128256: within TOL. fp32 runs tl.dot in ieee mode: only the summation order differs.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D,V", [(2048, 32000), (4096, 128256)])
@pytest.mark.parametrize("R", [1, 16, 32, 64])
def test_logits_gpu(R, D, V, dtype):
    x, norm_w, weight, last_idx = _logits_inputs(3 * R + 5, D, V, R, dtype, seed=11)
    out = logits_op.logits(x, norm_w, weight, last_idx, eps=1e-5, out=_poisoned(R, V, dtype=torch.float32))
    assert out.dtype == torch.float32
    _close(out, logits_op.reference(x, norm_w, weight, last_idx, eps=1e-5), dtype)


# Gemma 2's final soft-capping (cap 30; 1 as in tiny-gemma2, which caps every logit hard), on every candidate config
# of the decode and prefill buckets of a small vocabulary, fp32 (exact dots: the cap alone is under test) and bf16.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cap", [1.0, 30.0])
@pytest.mark.parametrize("bucket,max_S,R", [(1, 8, 1), (4, 8, 3), (16, 8, 8), (64, 64, 40)])
def test_logits_softcap_every_candidate_config_gpu(bucket, max_S, R, cap, dtype):
    D, V = 64, 368
    x, norm_w, weight, last_idx = _logits_inputs(2 * R + 7, D, V, R, dtype, seed=15)
    ref = logits_op.reference(x, norm_w, weight, last_idx, eps=1e-6, softcap=cap)
    meta = {"D": D, "V": V, "eps": 1e-6, "softcap": cap, "max_T": 128, "max_S": max_S, "T_bucket": bucket}
    for config in dict.fromkeys([*logits_op.SPEC.configs(meta), logits_op.SPEC.default(meta)]):
        out = logits_op.logits(x, norm_w, weight, last_idx, eps=1e-6, softcap=cap,
                               out=_poisoned(R, V, dtype=torch.float32), config=config)
        torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m, c=config: f"{c}: {m}")


@pytest.mark.parametrize("bucket,max_S,R", [(1, 32, 1), (4, 32, 3), (16, 32, 13), (64, 64, 40), (2048, 256, 200)])
def test_logits_every_candidate_config_gpu(bucket, max_S, R):
    # Every candidate autotuning may pick, in bf16 (tensor-core dots); 200 rows make the 64- and 128-row
    # blocks of the last bucket loop over row blocks.
    D, V, dtype = 2048, 32000, torch.bfloat16
    x, norm_w, weight, last_idx = _logits_inputs(2 * R + 7, D, V, R, dtype, seed=14)
    ref = logits_op.reference(x, norm_w, weight, last_idx, eps=1e-5)
    meta = {"D": D, "V": V, "eps": 1e-5, "max_T": 2048, "max_S": max_S, "T_bucket": bucket}
    for config in dict.fromkeys([*logits_op.SPEC.configs(meta), logits_op.SPEC.default(meta)]):
        out = logits_op.logits(x, norm_w, weight, last_idx, eps=1e-5, out=_poisoned(R, V, dtype=torch.float32),
                               config=config)
        torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m, c=config: f"{c}: {m}")


# The decode matrices of the tiny presets (hidden 64, intermediate 128 or 96, qkv 64 + 2 x 32) in every layout
# their buckets pick, launched plainly and with programmatic dependent launch (USE_PDL on, sm_90).
TINY = [(64, 128), (64, 256), (128, 64), (96, 64), (64, 64)]


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,N", TINY)
@pytest.mark.parametrize("T", [1, 3, 4, 16, 40])
def test_tiny_decode_shapes_every_candidate(T, K, N, dtype, pdl):
    from kernels.spec import alloc_scratch, run

    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    x = _rand(T, K, dtype=dtype, seed=8) + 0.1
    w = _rand(N, K, dtype=dtype, scale=K**-0.5, seed=9)
    residual = _rand(T, N, dtype=dtype, seed=10)
    dn = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    for op, extra in ((linear_op, {"has_bias": False, "has_residual": True}),
                      (rnl_op, {"has_bias": False, "eps": 1e-5, "act": None})):
        meta = {"K": K, "N": N, "max_T": 64, "max_S": 4, "T_bucket": T, **extra}
        want = linear_op.reference(x, w, None, residual) if op is linear_op else rnl_op.reference(x, w, eps=1e-5)
        for config in dict.fromkeys([*op.SPEC.configs(meta), op.SPEC.default(meta)]):
            plan = op.SPEC.plan(meta, {"x": dn, "w": dn, "out": dn, "residual": dn}, config)
            out = _poisoned(T, N, dtype=dtype)
            tensors = {"x": x, "w": w, "out": out, "residual": residual, **alloc_scratch(plan, "cuda")}
            run(plan, tensors, {"T": T, "S": T}, interpret=False, pdl=pdl)
            torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype],
                                       msg=lambda m, c=config, o=op: f"{o.__name__} {c}: {m}")
