"""Row-wise kernels on the GPU (Triton JIT through kernels.spec.run) against their torch references.

Covers add_rms_norm, rms_norm_gated, silu_mul, gelu_tanh_mul, embedding and rope (plain and writing the KV cache)
at model sizes, in bf16, fp16 and fp32, plus every candidate config of each op once in bf16.

Tolerances: kernel and reference both compute in fp32 from the same inputs and round once to the output
dtype, so they differ only by fp32 reduction order and fast exp (~1e-6 relative), which can flip the final
rounding by one ulp: 2^-7 relative in bf16, 2^-10 in fp16. Hence rtol 1.6e-2 for bf16, 2e-3 for fp16, and
1e-4 for fp32 (reduction order over up to 8192 columns). atol only covers values that round near zero.
The embedding gather is a copy and must be exact. Run: ``python -m pytest -q -m gpu tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch

from kernels import add_rms_norm, embedding, gelu_tanh_mul, rms_norm_gated, rope, silu_mul

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
TOL = {torch.bfloat16: (1e-3, 1.6e-2), torch.float16: (1e-4, 2e-3), torch.float32: (1e-5, 1e-4)}
DTYPES = list(TOL)
TOKENS = [1, 7, 256]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _gen(*key: int) -> torch.Generator:
    return torch.Generator(device=CUDA).manual_seed(hash(key) % 2**31)


def _nan(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=CUDA)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("D", [2048, 4096])
def test_add_rms_norm(D, T, dtype):
    g = _gen(D, T)
    x = torch.randn(T, D, generator=g, device=CUDA).to(dtype)
    residual = (4 * torch.randn(T, D, generator=g, device=CUDA)).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g, device=CUDA)).to(dtype)
    ref_out, ref_residual = add_rms_norm.reference(x, residual, w, eps=1e-5)
    out, res = add_rms_norm.add_rms_norm(x, residual, w, 1e-5, out=_nan(T, D, dtype=dtype), residual_out=residual)
    assert res is residual
    _close(residual, ref_residual)
    _close(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("D,n_groups", [(4096, 1), (4096, 8), (8192, 8)])
def test_rms_norm_gated(D, n_groups, T, dtype):
    g = _gen(D, n_groups, T)
    x = torch.randn(T, D, generator=g, device=CUDA).to(dtype)
    z = (2 * torch.randn(T, D, generator=g, device=CUDA)).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g, device=CUDA)).to(dtype)
    out = rms_norm_gated.rms_norm_gated(x, z, w, 1e-5, n_groups, out=_nan(T, D, dtype=dtype))
    _close(out, rms_norm_gated.reference(x, z, w, eps=1e-5, n_groups=n_groups))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("I", [5632, 14336])
@pytest.mark.parametrize("op", [silu_mul, gelu_tanh_mul], ids=["silu_mul", "gelu_tanh_mul"])
def test_gated_activation(op, I, T, dtype):
    x = (3 * torch.randn(T, 2 * I, generator=_gen(I, T), device=CUDA)).to(dtype)
    launcher = getattr(op, op.SPEC.name)
    _close(launcher(x, out=_nan(T, I, dtype=dtype)), op.reference(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("V,D", [(49152, 2048), (128256, 4096)])
def test_embedding(V, D, T, dtype):
    g = _gen(V, D, T)
    ids = torch.randint(0, V, (T,), generator=g, device=CUDA, dtype=torch.int32)
    ids[-1] = V - 1  # the last row of the table, where an offset overflow would show
    weight = torch.randn(V, D, generator=g, device=CUDA).to(dtype)
    out = embedding.embedding(ids, weight, out=_nan(T, D, dtype=dtype))
    torch.testing.assert_close(out, embedding.reference(ids, weight), atol=0, rtol=0)


# (Hq, Hk, Dh, Dr, is_neox, use_qk_norm): Llama-3-8B, TinyLlama, Qwen3, Phi-3 (Dh 96), partial GPT-J (Dh 80).
ROPE_SHAPES = [(32, 8, 128, 128, True, False), (32, 4, 64, 64, True, False), (16, 8, 128, 128, True, True),
               (32, 32, 96, 96, True, False), (16, 16, 80, 32, False, False)]
ROPE_IDS = ["llama3-8b", "tinyllama", "qwen3", "phi3", "partial-gptj"]
MAX_POS = 4096


def _rope_inputs(shape: tuple, T: int, dtype: torch.dtype):
    Hq, Hk, Dh, Dr, is_neox, use_qk_norm = shape
    g = _gen(Hq, Hk, Dh, Dr, T)
    qkv = torch.randn(T, (Hq + 2 * Hk) * Dh, generator=g, device=CUDA).to(dtype)
    positions = torch.randint(0, MAX_POS, (T,), generator=g, device=CUDA, dtype=torch.int32)
    inv_freq = 500000.0 ** (-torch.arange(0, Dr, 2, device=CUDA, dtype=torch.float32) / Dr)
    angles = torch.arange(MAX_POS, device=CUDA, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1).contiguous()
    q_norm = (1 + 0.2 * torch.randn(Dh, generator=g, device=CUDA)).to(dtype)
    k_norm = (1 + 0.2 * torch.randn(Dh, generator=g, device=CUDA)).to(dtype)
    attrs = {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": Dh, "rotary_dim": Dr, "is_neox": is_neox,
             "use_qk_norm": use_qk_norm, "eps": 1e-6}
    return qkv, positions, cos_sin, q_norm, k_norm, attrs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=ROPE_IDS)
def test_rope(shape, T, dtype):
    qkv, positions, cos_sin, q_norm, k_norm, attrs = _rope_inputs(shape, T, dtype)
    expected = rope.reference(qkv.clone(), positions, cos_sin, q_norm, k_norm, **attrs)
    rope.rope(qkv, positions, cos_sin, q_norm, k_norm, **attrs)
    v = (shape[0] + shape[1]) * shape[2]
    assert torch.equal(qkv[:, v:], expected[:, v:]), "v heads must be untouched"
    _close(qkv, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=ROPE_IDS)
def test_rope_writes_the_cache(shape, T, dtype, config=None):
    Hq, Hk, Dh = shape[:3]
    qkv, positions, cos_sin, q_norm, k_norm, attrs = _rope_inputs(shape, T, dtype)
    num_blocks, bs = -(-2 * T // 16) + 1, 16
    k_cache = _nan(num_blocks, bs, Hk, Dh, dtype=dtype)
    v_cache = _nan(num_blocks, bs, Hk, Dh, dtype=dtype)
    slots = torch.randperm(num_blocks * bs, generator=_gen(T, Hk, Dh), device=CUDA)[:T].to(torch.int32)
    slots[1::3] = -1  # padding rows
    original = qkv.clone()
    expected = rope.reference(qkv.clone(), positions, cos_sin, q_norm, k_norm, **attrs)
    rope.rope(qkv, positions, cos_sin, q_norm, k_norm, slots, k_cache, v_cache, **attrs, write_cache=True,
              config=config)
    _close(qkv, expected)
    # The cache rows hold exactly the k the kernel wrote to qkv and the v it left there; other slots stay NaN.
    keep = slots >= 0
    rows = slots[keep].long()
    k_written = k_cache.view(-1, Hk * Dh)[rows]
    v_written = v_cache.view(-1, Hk * Dh)[rows]
    assert torch.equal(k_written, qkv[keep, Hq * Dh:(Hq + Hk) * Dh])
    assert torch.equal(v_written, original[keep, (Hq + Hk) * Dh:])
    assert torch.equal(qkv[:, (Hq + Hk) * Dh:], original[:, (Hq + Hk) * Dh:]), "v heads of qkv must be untouched"
    assert k_cache.isnan().sum().item() == v_cache.isnan().sum().item() == (num_blocks * bs - len(rows)) * Hk * Dh


# Every config of the cache-writing form (its own binaries), once, at the Qwen3 shape (q/k norm, GQA).
@pytest.mark.parametrize("config", rope.configs({"num_q_heads": 16, "num_kv_heads": 8, "write_cache": True}), ids=str)
def test_rope_writes_the_cache_every_config_bf16(config):
    test_rope_writes_the_cache(ROPE_SHAPES[2], 37, torch.bfloat16, config=config)


# Each candidate config is its own binary: run every one once, as the autotuner would.
def _config_cases():
    cases = [(add_rms_norm, {"D": 4096}), (rms_norm_gated, {"D": 8192, "n_groups": 8}), (silu_mul, {"I": 14336}),
             (gelu_tanh_mul, {"I": 14336}), (embedding, {"V": 128256, "D": 4096})]
    out = [(op, c) for op, meta in cases for c in op.configs(meta)]
    rope_meta = dict(zip(("num_q_heads", "num_kv_heads"), ROPE_SHAPES[2][:2]))
    return out + [(rope, c) for c in rope.configs(rope_meta)]


@pytest.mark.parametrize("op,config", _config_cases(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_config_bf16(op, config):
    T, dtype = 37, torch.bfloat16
    g = _gen(T)
    if op is add_rms_norm:
        x, r, w = (torch.randn(*s, generator=g, device=CUDA).to(dtype) for s in ((T, 4096), (T, 4096), (4096,)))
        out, res = op.add_rms_norm(x, r, w, 1e-5, out=_nan(T, 4096, dtype=dtype), config=config)
        for a, b in zip((out, res), op.reference(x, r, w, eps=1e-5)):
            _close(a, b)
    elif op is rms_norm_gated:
        x, z, w = (torch.randn(*s, generator=g, device=CUDA).to(dtype) for s in ((T, 8192), (T, 8192), (8192,)))
        out = op.rms_norm_gated(x, z, w, 1e-5, 8, out=_nan(T, 8192, dtype=dtype), config=config)
        _close(out, op.reference(x, z, w, eps=1e-5, n_groups=8))
    elif op in (silu_mul, gelu_tanh_mul):
        x = torch.randn(T, 2 * 14336, generator=g, device=CUDA).to(dtype)
        _close(getattr(op, op.SPEC.name)(x, out=_nan(T, 14336, dtype=dtype), config=config), op.reference(x))
    elif op is embedding:
        ids = torch.randint(0, 128256, (T,), generator=g, device=CUDA, dtype=torch.int32)
        weight = torch.randn(128256, 4096, generator=g, device=CUDA).to(dtype)
        out = op.embedding(ids, weight, out=_nan(T, 4096, dtype=dtype), config=config)
        torch.testing.assert_close(out, op.reference(ids, weight), atol=0, rtol=0)
    else:
        qkv, positions, cos_sin, q_norm, k_norm, attrs = _rope_inputs(ROPE_SHAPES[2], T, dtype)
        expected = op.reference(qkv.clone(), positions, cos_sin, q_norm, k_norm, **attrs)
        _close(op.rope(qkv, positions, cos_sin, q_norm, k_norm, **attrs, config=config), expected)
