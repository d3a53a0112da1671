"""The moe op with quantized experts (--quant int8 / int4) against the maths on the dequantized weights.

Each expert's [N, K] matrix is quantized as a linear's weight is (kernels/weight_quant.py); the reference dequantizes
it here from the schemes' definitions (int8: q * scale per row; int4: nibble k of byte k // 2, low nibble for even k,
q * scale + min per group along K) and runs test_moe's float64 maths on it.
"""

import pytest
import torch

from kernels.moe import _config, _grouped, default, moe, reference
from kernels.weight_quant import quantize_int4, quantize_int8
from tests.kernels.test_moe import _inputs, _probs, _scratch, maths

SHAPE = {"E": 8, "D": 64, "I": 32, "top_k": 2, "max_T": 64, "max_S": 4}
FORMS = {"gemv": default({**SHAPE, "T_bucket": 1}), "grouped": default({**SHAPE, "T_bucket": 16})}
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]


def _quantize(w: torch.Tensor, scheme: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> each expert's matrix in the scheme, stacked: (q [E, N, K] or [E, N, K / 2], scale)."""
    parts = [quantize_int8(m) if scheme == "int8" else quantize_int4(m, group) for m in w]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


def _dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: str, group: int) -> torch.Tensor:
    if scheme == "int8":
        return q.double() * scale.double()[..., None]
    nibbles = torch.stack([q & 15, q >> 4], dim=-1).flatten(-2).double()  # [E, N, K], byte j -> k = 2j, 2j + 1
    E, N, K = nibbles.shape
    s = scale.double()
    return (nibbles.view(E, N, K // group, group) * s[..., 0:1] + s[..., 1:2]).view(E, N, K)


def _case(T, D, I, E, dtype, scheme, group, seed=0):
    x, router, w13, w2, residual = _inputs(T, D, I, E, dtype, seed)
    q13, s13 = _quantize(w13, scheme, group)
    q2, s2 = _quantize(w2, scheme, group)
    deq = (_dequantize(q13, s13, scheme, group), _dequantize(q2, s2, scheme, group))
    return (x, router, q13, q2, residual), (s13, s2), deq


# (T, D, I, E, top_k, scheme, group): int8 at awkward sizes (partial row and K tiles), int4 where the groups divide
# D and I; groups of 32 (a GEMV chunk of 64 holds two) and 64 (a grouped chunk of 32 lies inside one).
CASES = [(1, 48, 40, 8, 2, "int8", 0), (7, 100, 70, 6, 3, "int8", 0), (1, 64, 96, 4, 2, "int4", 32),
         (9, 128, 64, 5, 3, "int4", 64), (4, 64, 32, 3, 3, "int4", 32)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("T,D,I,E,top_k,scheme,group", CASES)
def test_quantized_experts_match_the_maths(T, D, I, E, top_k, scheme, group, dtype, atol, rtol, form):
    (x, router, q13, q2, residual), (s13, s2), (w13, w2) = _case(T, D, I, E, dtype, scheme, group)
    out = torch.full((T, D), float("nan"), dtype=dtype)
    scratch = _scratch(T, I, top_k, dtype)
    moe(x, router, q13, q2, residual, top_k=top_k, renormalize=True, w13_scale=s13, w2_scale=s2, out=out,
        scratch=scratch, config=FORMS[form])
    assert torch.equal(scratch["topk_ids"].view(T, top_k).long(), torch.topk(_probs(x, router), top_k).indices)
    want = maths(x, router, w13, w2, residual, top_k, True)
    torch.testing.assert_close(out.double(), want, atol=atol * 10, rtol=rtol * 10)
    torch.testing.assert_close(out, reference(x, router, q13, q2, residual, top_k=top_k, renormalize=True,
                                              w13_scale=s13, w2_scale=s2), atol=atol, rtol=rtol)
    # The quantization is real: the unquantized experts give measurably different outputs.
    exact = maths(x, router, *_inputs(T, D, I, E, dtype)[2:4], residual, top_k, True)
    assert (out.double() - exact).abs().max() > 10 * (out.double() - want).abs().max()


# Tiles whose K chunk is shorter than, equal to and longer than an int4 group, and int8 chunks of 16 and more, in
# both forms; T = 21 makes several token tiles per expert in the grouped form.
_BUCKET = {"T_bucket": 21, "max_T": 21, "top_k": 2}
TILES = [_config((8, 32, 4)), _config((16, 64, 4)), _config((32, 128, 8)), _grouped((16, 64, 32, 4), _BUCKET),
         _grouped((32, 64, 32, 4), _BUCKET)]


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 64)])
@pytest.mark.parametrize("config", TILES, ids=str)
def test_every_tile_dequantizes(config, scheme, group):
    T = 21 if "BLOCK_M" in dict(config.constexprs) else 1
    (x, router, q13, q2, residual), (s13, s2), (w13, w2) = _case(T, 128, 192, 4, torch.float32, scheme, group, 3)
    out = torch.full((T, 128), float("nan"))
    moe(x, router, q13, q2, residual, top_k=2, renormalize=False, w13_scale=s13, w2_scale=s2, out=out,
        config=config)
    torch.testing.assert_close(out.double(), maths(x, router, w13, w2, residual, 2, False), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_quantized_experts_with_a_shared_expert(form):
    T, D, I, E = 5, 64, 32, 4
    (x, router, q13, q2, residual), (s13, s2), (w13, w2) = _case(T, D, I, E, torch.float32, "int4", 32, 5)
    g = torch.Generator().manual_seed(23)
    shared, shared_gate = torch.randn(T, D, generator=g), torch.randn(1, D, generator=g)
    out = moe(x, router, q13, q2, residual, shared, shared_gate, top_k=2, renormalize=False, w13_scale=s13,
              w2_scale=s2, config=FORMS[form])
    want = maths(x, router, w13, w2, residual, 2, False) + torch.sigmoid(x.double() @ shared_gate.double().T) * \
        shared.double()
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_moe_quantized_cross_compiles():
    # Both schemes, both forms, Qwen3-30B-A3B's expert shape in bf16, the defaults only.
    import dataclasses

    from kernels.moe import SPEC
    from tests.kernels.aot_util import assert_cross_compiles

    spec = dataclasses.replace(SPEC, configs=lambda meta: [])
    for quant, w_dtype in (("int8", "i8"), ("int4", "u8")):
        for bucket, launches in ((1, 3), (256, 6)):
            meta = {"E": 128, "D": 2048, "I": 768, "top_k": 8, "renormalize": True, "max_T": 256, "max_S": 8,
                    "T_bucket": bucket, "quant": quant, **({"group_size": 128} if quant == "int4" else {})}
            dtypes = {**{r: "bf16" for r in ("x", "router", "residual", "out")}, "w13": w_dtype, "w2": w_dtype,
                      "w13_scale": "fp32", "w2_scale": "fp32"}
            assert assert_cross_compiles(spec, meta, dtypes) == 3 * launches
