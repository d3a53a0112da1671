"""kv_cache_write, attention_prefill and attention_decode on the GPU (Triton JIT) vs their torch references.

Tolerances: the kernels multiply in the input dtype with fp32 accumulation, but cast the softmax weights p
to the input dtype for the p @ v product (as FlashAttention does) and round the output to it. Half an ulp
is 2^-9 ~ 0.2% in bf16 and 2^-11 ~ 0.05% in fp16, for values up to |v| ~ 4: 2e-2 (bf16) and 3e-3 (fp16)
leave a margin over both roundings. fp32 uses exact ("ieee") dots, so only exp2 vs exp and summation order
differ: 1e-4. The cache write is a copy and must be exact.
"""

import itertools

import pytest
import torch

from kernels.attention_decode import attention_decode
from kernels.attention_decode import reference as decode_reference
from kernels.attention_prefill import attention_prefill
from kernels.attention_prefill import reference as prefill_reference
from kernels.kv_cache_write import kv_cache_write
from kernels.kv_cache_write import reference as write_reference
from kernels.spec import Config
from tests.kernels.test_attention_prefill import BLOCK_SIZE, paged_kv, qkv_rows

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}
DTYPES = list(TOLERANCE)
# (Hq, Hk, Dh): Llama-3-8B, SmolLM2-135M, Phi-3-mini (MHA, Dh 96), Gemma-2B (MQA, Dh 256).
HEADS = [(32, 8, 128), (9, 3, 64), (32, 32, 96), (8, 1, 256)]
# (q_len, kv_len): a fresh 512-token prompt, 300 new tokens after a 700-token prefix, one token after 2048,
# a padding sequence, a 1200-token prompt ending mid-block.
PREFILL = [(512, 512), (300, 1000), (1, 2049), (0, 0), (1200, 1203)]


def _attrs(hq: int, hk: int, dh: int) -> dict:
    return {"num_q_heads": hq, "num_kv_heads": hk, "head_dim": dh, "scale": dh**-0.5}


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hk,dh", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("T", [1, 37, 2048])
def test_kv_cache_write_gpu(T, hq, hk, dh, dtype):
    gen = torch.Generator().manual_seed(T)
    qkv = torch.randn(T, (hq + 2 * hk) * dh, generator=gen).to(DEVICE, dtype)
    num_blocks = T // BLOCK_SIZE + 8
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hk, dh, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, hk, dh, generator=gen).to(DEVICE, dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:T].to(torch.int32)
    slots[1::5] = -1
    slots = slots.to(DEVICE)
    attrs = {"num_q_heads": hq, "num_kv_heads": hk, "head_dim": dh}
    k_ref, v_ref = write_reference(qkv, slots, k_cache.clone(), v_cache.clone(), **attrs)
    kv_cache_write(qkv, slots, k_cache, v_cache, **attrs, block_size=BLOCK_SIZE)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def _prefill_case(hq: int, hk: int, dh: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[int, dict]:
    """The PREFILL sequences' rows, paged caches and lengths: (T, the kernel's tensor arguments)."""
    q_lens = [q for q, _ in PREFILL]
    k_cache, v_cache, tables = paged_kv([kv for _, kv in PREFILL], hk, dh, dtype, gen, DEVICE)
    T = sum(q_lens)
    return T, {"qkv": qkv_rows(T, hq, hk, dh, dtype, gen, DEVICE), "k_cache": k_cache, "v_cache": v_cache,
               "cu_seqlens_q": torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEVICE),
               "seq_lens": torch.tensor([kv for _, kv in PREFILL], dtype=torch.int32, device=DEVICE),
               "block_tables": tables}


def _decode_case(S: int, hq: int, hk: int, dh: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[list, dict]:
    """S decode rows over _decode_lens contexts: (the lengths, the kernel's tensor arguments)."""
    lens = _decode_lens(S, gen)
    k_cache, v_cache, tables = paged_kv(lens, hk, dh, dtype, gen, DEVICE)
    return lens, {"qkv": qkv_rows(S, hq, hk, dh, dtype, gen, DEVICE), "k_cache": k_cache, "v_cache": v_cache,
                  "seq_lens": torch.tensor(lens, dtype=torch.int32, device=DEVICE), "block_tables": tables}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hk,dh", HEADS)
@pytest.mark.parametrize("window", [0, 700], ids=["full", "window700"])  # 700: mid-block, shorter than most
def test_attention_prefill_gpu(window, hq, hk, dh, dtype):
    T, case = _prefill_case(hq, hk, dh, dtype, torch.Generator().manual_seed(hq + dh))
    out = torch.full((T, hq * dh), float("nan"), dtype=dtype, device=DEVICE)
    attention_prefill(**case, **_attrs(hq, hk, dh), block_size=BLOCK_SIZE, window=window, out=out)
    _assert_close(out, prefill_reference(**case, **_attrs(hq, hk, dh), window=window))


def _decode_lens(S: int, gen: torch.Generator) -> list[int]:
    """A full 4096-token context alone, or beside a padding row, one token, one block and random lengths."""
    if S == 1:
        return [4096]
    return [0, 1, 4096, 16] + torch.randint(2, 2049, (S - 4,), generator=gen).tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hk,dh", HEADS)
@pytest.mark.parametrize("S", [1, 32])
@pytest.mark.parametrize("splits", [None, 1], ids=["default", "one_split"])
@pytest.mark.parametrize("window", [0, 1000], ids=["full", "window1000"])
def test_attention_decode_gpu(window, splits, S, hq, hk, dh, dtype):
    lens, case = _decode_case(S, hq, hk, dh, dtype, torch.Generator().manual_seed(S * 1000 + hq + dh))
    config = None if splits is None else Config.make(BLOCK_N=32, NUM_SPLITS=splits)
    out = torch.full((S, hq * dh), float("nan"), dtype=dtype, device=DEVICE)
    attention_decode(**case, **_attrs(hq, hk, dh), block_size=BLOCK_SIZE, window=window, out=out, config=config)
    _assert_close(out, decode_reference(**case, **_attrs(hq, hk, dh), window=window))
    if 0 in lens:
        assert (out[lens.index(0)] == 0).all(), "a padding row must give zeros"


# Gemma 2's attention soft-capping (cap 50 in the real model; 2 here so nearly every score is capped) with a
# sliding window, as the tiny-gemma2 preset has it, on the two head shapes of Gemma 2 (Dh 256 MQA) and a Dh 64.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hk,dh", [(8, 1, 256), (9, 3, 64)])
@pytest.mark.parametrize("window", [0, 700], ids=["full", "window700"])
@pytest.mark.parametrize("softcap", [2.0, 50.0])
def test_attention_prefill_softcap_gpu(softcap, window, hq, hk, dh, dtype):
    T, case = _prefill_case(hq, hk, dh, dtype, torch.Generator().manual_seed(hq + dh + 1))
    kw = {**_attrs(hq, hk, dh), "window": window, "softcap": softcap}
    out = torch.full((T, hq * dh), float("nan"), dtype=dtype, device=DEVICE)
    attention_prefill(**case, **kw, block_size=BLOCK_SIZE, out=out)
    _assert_close(out, prefill_reference(**case, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hk,dh", [(8, 1, 256), (9, 3, 64)])
@pytest.mark.parametrize("splits", [None, 1], ids=["default", "one_split"])
@pytest.mark.parametrize("window", [0, 1000], ids=["full", "window1000"])
def test_attention_decode_softcap_gpu(window, splits, hq, hk, dh, dtype):
    _, case = _decode_case(32, hq, hk, dh, dtype, torch.Generator().manual_seed(hq + dh + 2))
    kw = {**_attrs(hq, hk, dh), "window": window, "softcap": 2.0}
    config = None if splits is None else Config.make(BLOCK_N=32, NUM_SPLITS=splits)
    out = torch.full((32, hq * dh), float("nan"), dtype=dtype, device=DEVICE)
    attention_decode(**case, **kw, block_size=BLOCK_SIZE, out=out, config=config)
    _assert_close(out, decode_reference(**case, **kw))
