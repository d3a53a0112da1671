import pytest
import torch

from kernels.rope import SPEC, configs, reference, rope

# (T, Hq, Hk, Dh, Dr, use_qk_norm): full and partial rotary, head dims 64/80/96/128, one and many tokens.
CASES = [
    (1, 4, 2, 64, 64, False),
    (5, 3, 1, 80, 80, False),
    (7, 6, 2, 96, 96, False),
    (3, 2, 2, 128, 64, False),
    (4, 5, 1, 96, 32, False),
    (6, 4, 2, 64, 64, True),
    (3, 3, 1, 80, 48, True),
    (9, 8, 8, 128, 128, True),
]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
MAX_POS = 300


def _table(inv_freq: torch.Tensor, max_pos: int) -> torch.Tensor:
    """[max_pos, Dr] fp32: cos | sin of position * inv_freq, the layout the compiler writes."""
    angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1).contiguous()


def _inputs(T, Hq, Hk, Dh, Dr, dtype, max_pos=MAX_POS, seed=0):
    g = torch.Generator().manual_seed(seed + T * 7919 + Hq * 131 + Dh * 17 + Dr)
    qkv = torch.randn(T, (Hq + 2 * Hk) * Dh, generator=g).to(dtype)
    positions = torch.randint(0, max_pos, (T,), generator=g, dtype=torch.int32)
    positions[0] = 0  # a padding row's position
    cos_sin = _table(10000.0 ** (-torch.arange(0, Dr, 2, dtype=torch.float32) / Dr), max_pos)
    q_norm = (1 + 0.2 * torch.randn(Dh, generator=g)).to(dtype)
    k_norm = (1 + 0.2 * torch.randn(Dh, generator=g)).to(dtype)
    return qkv, positions, cos_sin, q_norm, k_norm


def _attrs(Hq, Hk, Dh, Dr, is_neox, use_qk_norm):
    return {"num_q_heads": Hq, "num_kv_heads": Hk, "head_dim": Dh, "rotary_dim": Dr, "is_neox": is_neox,
            "use_qk_norm": use_qk_norm, "eps": 1e-6}


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("T,Hq,Hk,Dh,Dr,use_qk_norm", CASES)
def test_rope_matches_reference(T, Hq, Hk, Dh, Dr, use_qk_norm, is_neox, dtype, atol, rtol):
    qkv, positions, cos_sin, q_norm, k_norm = _inputs(T, Hq, Hk, Dh, Dr, dtype)
    attrs = _attrs(Hq, Hk, Dh, Dr, is_neox, use_qk_norm)
    original = qkv.clone()
    expected = reference(qkv.clone(), positions, cos_sin, q_norm, k_norm, **attrs)
    assert rope(qkv, positions, cos_sin, q_norm, k_norm, **attrs) is qkv
    torch.testing.assert_close(qkv, expected, atol=atol, rtol=rtol)
    # v heads, and without q/k norm the pass-through columns, must be left bit for bit.
    v = slice((Hq + Hk) * Dh, None)
    assert torch.equal(qkv[:, v], original[:, v])
    if not use_qk_norm:
        heads = qkv[:, :(Hq + Hk) * Dh].view(T, Hq + Hk, Dh)
        assert torch.equal(heads[..., Dr:], original[:, :(Hq + Hk) * Dh].view(T, Hq + Hk, Dh)[..., Dr:])


def test_reference_rotates_pairs_from_the_maths():
    # One head, Dh = 4, Dr = 4: neox pairs (0, 2), (1, 3); GPT-J pairs (0, 1), (2, 3).
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cos_sin = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.6, 0.0, 0.8, 1.0]])  # row 1: cos (0.6, 0), sin (0.8, 1)
    pos = torch.tensor([1], dtype=torch.int32)
    attrs = {"num_q_heads": 1, "num_kv_heads": 0, "head_dim": 4, "rotary_dim": 4}
    neox = reference(x.clone(), pos, cos_sin, **attrs, is_neox=True)
    gptj = reference(x.clone(), pos, cos_sin, **attrs, is_neox=False)
    torch.testing.assert_close(neox, torch.tensor([[1 * 0.6 - 3 * 0.8, 0 - 4 * 1.0, 3 * 0.6 + 1 * 0.8, 2.0]]))
    torch.testing.assert_close(gptj, torch.tensor([[1 * 0.6 - 2 * 0.8, 2 * 0.6 + 1 * 0.8, -4.0, 3.0]]))


def test_matches_hf_llama_with_llama3_scaling():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    T, Hq, Hk, Dh, max_pos = 6, 4, 2, 64, 9000
    config = LlamaConfig(hidden_size=Hq * Dh, num_attention_heads=Hq, num_key_value_heads=Hk, head_dim=Dh,
                         max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    emb = LlamaRotaryEmbedding(config)
    qkv, _, _, _, _ = _inputs(T, Hq, Hk, Dh, Dh, torch.float32)
    positions = torch.tensor([0, 1, 17, 4000, 8191, 8999], dtype=torch.int32)
    cos, sin = emb(qkv, positions.long()[None])  # [1, T, Dh], each half repeated
    table = _table(emb.inv_freq, max_pos)
    q = qkv[:, :Hq * Dh].view(1, T, Hq, Dh).transpose(1, 2)
    k = qkv[:, Hq * Dh:(Hq + Hk) * Dh].view(1, T, Hk, Dh).transpose(1, 2)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    rope(qkv, positions, table, **_attrs(Hq, Hk, Dh, Dh, True, False))
    torch.testing.assert_close(qkv[:, :Hq * Dh], q_hf.transpose(1, 2).reshape(T, Hq * Dh), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv[:, Hq * Dh:(Hq + Hk) * Dh], k_hf.transpose(1, 2).reshape(T, Hk * Dh),
                               atol=1e-5, rtol=1e-5)


def test_matches_hf_gpt_neox_partial_rotary():
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    T, Hq, Hk, Dh, Dr = 5, 3, 3, 80, 20
    qkv, positions, cos_sin, _, _ = _inputs(T, Hq, Hk, Dh, Dr, torch.float32)
    cos, sin = cos_sin[positions.long()].chunk(2, dim=1)
    cos, sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    q = qkv[:, :Hq * Dh].view(1, T, Hq, Dh).transpose(1, 2)
    k = qkv[:, Hq * Dh:2 * Hq * Dh].view(1, T, Hk, Dh).transpose(1, 2)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    rope(qkv, positions, cos_sin, **_attrs(Hq, Hk, Dh, Dr, True, False))
    expected = torch.cat([q_hf, k_hf], dim=1).transpose(1, 2).reshape(T, (Hq + Hk) * Dh)
    torch.testing.assert_close(qkv[:, :(Hq + Hk) * Dh], expected, atol=1e-5, rtol=1e-5)


def test_matches_hf_gptj_interleaved_partial_rotary():
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    T, Hq, Hk, Dh, Dr = 4, 2, 2, 96, 32
    qkv, positions, _, _, _ = _inputs(T, Hq, Hk, Dh, Dr, torch.float32)
    sincos = create_sinusoidal_positions(MAX_POS, Dr)  # [max_pos, Dr]: sin | cos
    sin, cos = sincos[positions.long()][None].chunk(2, dim=-1)  # [1, T, Dr/2]
    heads = qkv[:, :(Hq + Hk) * Dh].view(1, T, Hq + Hk, Dh)
    rotated = apply_rotary_pos_emb(heads[..., :Dr], sin, cos)
    expected = torch.cat([rotated, heads[..., Dr:]], -1).reshape(T, (Hq + Hk) * Dh)
    table = torch.cat([sincos[:, Dr // 2:], sincos[:, :Dr // 2]], dim=1).contiguous()
    rope(qkv, positions, table, **_attrs(Hq, Hk, Dh, Dr, False, False))
    torch.testing.assert_close(qkv[:, :(Hq + Hk) * Dh], expected, atol=1e-5, rtol=1e-5)


def test_matches_hf_qwen3_qk_norm():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    T, Hq, Hk, Dh = 5, 4, 2, 128
    qkv, positions, cos_sin, q_w, k_w = _inputs(T, Hq, Hk, Dh, Dh, torch.float32)
    q_norm, k_norm = Qwen3RMSNorm(Dh, eps=1e-6), Qwen3RMSNorm(Dh, eps=1e-6)
    q_norm.weight.data.copy_(q_w)
    k_norm.weight.data.copy_(k_w)
    cos, sin = cos_sin[positions.long()].chunk(2, dim=1)
    cos, sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    with torch.no_grad():
        q = q_norm(qkv[:, :Hq * Dh].view(1, T, Hq, Dh)).transpose(1, 2)
        k = k_norm(qkv[:, Hq * Dh:(Hq + Hk) * Dh].view(1, T, Hk, Dh)).transpose(1, 2)
        q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    rope(qkv, positions, cos_sin, q_w, k_w, **_attrs(Hq, Hk, Dh, Dh, True, True))
    expected = torch.cat([q_hf, k_hf], dim=1).transpose(1, 2).reshape(T, (Hq + Hk) * Dh)
    torch.testing.assert_close(qkv[:, :(Hq + Hk) * Dh], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", configs(_attrs(9, 3, 80, 48, True, True)), ids=str)
def test_every_config(config):
    # 12 q/k heads do not fill a 8- or 16-head tile, so the head mask is exercised too.
    qkv, positions, cos_sin, q_norm, k_norm = _inputs(3, 9, 3, 80, 48, torch.float32)
    attrs = _attrs(9, 3, 80, 48, False, True)
    expected = reference(qkv.clone(), positions, cos_sin, q_norm, k_norm, **attrs)
    rope(qkv, positions, cos_sin, q_norm, k_norm, **attrs, config=config)
    torch.testing.assert_close(qkv, expected, atol=1e-5, rtol=1e-5)


# (T, Hq, Hk, Dh, Dr, use_qk_norm, is_neox) for the cache-writing form: MHA and GQA, head_dim 80, partial rotary
# (the cache needs the pass-through columns too), Qwen3 q/k norm (v heads must not be normed), GPT-J pairing.
CACHE_CASES = [
    (1, 4, 2, 64, 64, False, True),
    (7, 3, 3, 80, 80, False, True),
    (9, 8, 2, 80, 48, False, False),
    (5, 6, 2, 96, 32, True, True),
    (6, 4, 1, 128, 128, True, False),
]
BLOCK_SIZE = 4


def _cache_case(T, Hk, Dh, dtype, seed):
    """NaN-filled caches over enough blocks that slots spread, and a slot mapping with padding rows (-1)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-2 * T // BLOCK_SIZE) + 1
    k_cache = torch.full((num_blocks, BLOCK_SIZE, Hk, Dh), float("nan"), dtype=dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:T].to(torch.int32)
    slots[1::3] = -1
    return slots, k_cache, k_cache.clone()


def _expected_caches(qkv_after, original, slots, k_cache, v_cache, Hq, Hk, Dh):
    """The caches as the maths says: row slot of each cache holds that token's k (rotated) and v heads."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            block, offset = divmod(slot, BLOCK_SIZE)
            k_cache[block, offset] = qkv_after[t, Hq * Dh:(Hq + Hk) * Dh].view(Hk, Dh)
            v_cache[block, offset] = original[t, (Hq + Hk) * Dh:].view(Hk, Dh)
    return k_cache, v_cache


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("T,Hq,Hk,Dh,Dr,use_qk_norm,is_neox", CACHE_CASES)
def test_rope_writes_the_cache(T, Hq, Hk, Dh, Dr, use_qk_norm, is_neox, dtype, atol, rtol):
    qkv, positions, cos_sin, q_norm, k_norm = _inputs(T, Hq, Hk, Dh, Dr, dtype)
    slots, k_cache, v_cache = _cache_case(T, Hk, Dh, dtype, seed=T * 31 + Dh)
    attrs = _attrs(Hq, Hk, Dh, Dr, is_neox, use_qk_norm)
    original, k_before, v_before = qkv.clone(), k_cache.clone(), v_cache.clone()
    expected_qkv = reference(qkv.clone(), positions, cos_sin, q_norm, k_norm, **attrs)
    out = rope(qkv, positions, cos_sin, q_norm, k_norm, slots, k_cache, v_cache, **attrs, write_cache=True)
    assert out[0] is qkv and out[1] is k_cache and out[2] is v_cache
    # qkv is exactly what the plain form gives: q and k rotated, v left bit for bit.
    torch.testing.assert_close(qkv, expected_qkv, atol=atol, rtol=rtol)
    assert torch.equal(qkv[:, (Hq + Hk) * Dh:], original[:, (Hq + Hk) * Dh:])
    # The cache holds the very values the kernel wrote to qkv (one rounding, shared), v copied exactly, and
    # nothing else: padding rows and unused slots keep their NaN (equal_nan compares them as equal).
    k_want, v_want = _expected_caches(qkv, original, slots, k_before, v_before, Hq, Hk, Dh)
    torch.testing.assert_close(k_cache, k_want, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_want, atol=0, rtol=0, equal_nan=True)
    written = (slots >= 0).sum().item() * Hk * Dh
    assert (~k_cache.isnan()).sum().item() == written == (~v_cache.isnan()).sum().item()


def test_cache_writing_reference_is_rope_then_kv_cache_write():
    T, Hq, Hk, Dh, Dr = 6, 4, 2, 80, 80
    qkv, positions, cos_sin, q_norm, k_norm = _inputs(T, Hq, Hk, Dh, Dr, torch.float32)
    slots, k_cache, v_cache = _cache_case(T, Hk, Dh, torch.float32, seed=5)
    attrs = _attrs(Hq, Hk, Dh, Dr, True, True)
    original, k_before, v_before = qkv.clone(), k_cache.clone(), v_cache.clone()
    out_qkv, out_k, out_v = reference(qkv, positions, cos_sin, q_norm, k_norm, slots, k_cache, v_cache, **attrs,
                                      write_cache=True)
    assert out_qkv is qkv and out_k is k_cache and out_v is v_cache, "the caches are updated in place"
    torch.testing.assert_close(qkv, reference(original.clone(), positions, cos_sin, q_norm, k_norm, **attrs),
                               atol=0, rtol=0)
    k_want, v_want = _expected_caches(qkv, original, slots, k_before, v_before, Hq, Hk, Dh)
    torch.testing.assert_close(k_cache, k_want, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_want, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("config", configs({**_attrs(5, 2, 80, 48, True, True), "write_cache": True}), ids=str)
def test_every_config_writes_the_cache(config):
    # 9 heads (5 q, 2 k, 2 v) fill no tile exactly, so k and v heads share tiles with each other and with q.
    T, Hq, Hk, Dh, Dr = 5, 5, 2, 80, 48
    qkv, positions, cos_sin, q_norm, k_norm = _inputs(T, Hq, Hk, Dh, Dr, torch.float32)
    slots, k_cache, v_cache = _cache_case(T, Hk, Dh, torch.float32, seed=11)
    attrs = _attrs(Hq, Hk, Dh, Dr, False, True)
    want = reference(qkv.clone(), positions, cos_sin, q_norm, k_norm, slots, k_cache.clone(), v_cache.clone(),
                     **attrs, write_cache=True)
    got = rope(qkv, positions, cos_sin, q_norm, k_norm, slots, k_cache, v_cache, **attrs, write_cache=True,
               config=config)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_odd_rotary_dim_is_rejected():
    qkv, positions, cos_sin, _, _ = _inputs(2, 1, 1, 64, 64, torch.float32)
    with pytest.raises(ValueError, match="rotary_dim=63"):
        rope(qkv, positions, cos_sin[:, :63].contiguous(), **_attrs(1, 1, 64, 63, True, False))


# Every dtype for the plain Llama layout; the q/k-norm and partial GPT-J variants (other constexpr branches)
# in one dtype each, which keeps this file's cold-cache compile time down.
@pytest.mark.parametrize("shape,dtype", [
    ((32, 8, 128, 128, True, False), "fp32"),
    ((32, 8, 128, 128, True, False), "fp16"),
    ((32, 8, 128, 128, True, False), "bf16"),
    ((16, 8, 128, 128, True, True), "bf16"),
    ((32, 32, 80, 40, False, False), "fp16"),
], ids=["llama-fp32", "llama-fp16", "llama-bf16", "qwen3-bf16", "partial-gptj-fp16"])
def test_rope_cross_compiles(shape, dtype):
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {**_attrs(*shape), "max_pos": 4096, "max_blocks": 128, "max_T": 64, "max_S": 8}
    dtypes = {"qkv": dtype, "positions": "i32", "cos_sin": "fp32"}
    if shape[-1]:
        dtypes |= {"q_norm": dtype, "k_norm": dtype}
    assert assert_cross_compiles(SPEC, meta, dtypes) >= 3


# The cache-writing form: the Llama layout in every dtype, Qwen3 and partial rotary (pass-through columns go
# to the cache) in one each.
@pytest.mark.parametrize("shape,dtype", [
    ((32, 8, 128, 128, True, False), "fp32"),
    ((32, 8, 128, 128, True, False), "fp16"),
    ((32, 8, 128, 128, True, False), "bf16"),
    ((16, 8, 128, 128, True, True), "bf16"),
    ((32, 32, 80, 40, False, False), "fp16"),
], ids=["llama-fp32", "llama-fp16", "llama-bf16", "qwen3-bf16", "partial-gptj-fp16"])
def test_rope_cache_write_cross_compiles(shape, dtype):
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {**_attrs(*shape), "write_cache": True, "max_pos": 4096, "max_blocks": 128, "max_T": 64, "max_S": 8}
    dtypes = {"qkv": dtype, "positions": "i32", "cos_sin": "fp32", "slot_mapping": "i32", "k_cache": dtype,
              "v_cache": dtype}
    if shape[-1]:
        dtypes |= {"q_norm": dtype, "k_norm": dtype}
    assert assert_cross_compiles(SPEC, meta, dtypes) >= 3
