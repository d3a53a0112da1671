import pytest
import torch

from kernels.silu_mul import SPEC, configs, reference, silu_mul

CASES = [(1, 1), (5, 123), (37, 700), (3, 2500)]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]


def _inputs(T: int, I: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(T * 10007 + I)
    x = (3 * torch.randn(T, 2 * I, generator=g)).to(dtype)
    out = torch.full((T, I), float("nan"), dtype=dtype)
    return x, out


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("T,I", CASES)
def test_silu_mul_matches_reference(T, I, dtype, atol, rtol):
    x, out = _inputs(T, I, dtype)
    silu_mul(x, out=out)
    torch.testing.assert_close(out, reference(x), atol=atol, rtol=rtol)


def test_reference_is_swiglu():
    # The reference computes in fp32 whatever the input dtype, so a float64 input agrees to fp32 rounding only.
    x = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reference(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", configs({"I": 2500}), ids=str)
def test_every_config_covers_the_row(config):
    # I = 2500 is not a multiple of any block, so each config's last column tile is partial.
    x, out = _inputs(3, 2500, torch.float32)
    silu_mul(x, out=out, config=config)
    torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)


def test_extreme_gates_stay_finite():
    x = torch.tensor([[-1e4, -100.0, 0.0, 100.0, 1e4, 2.0, 2.0, 2.0, 2.0, 2.0]])
    out = silu_mul(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(x))


def test_strided_rows():
    x = torch.randn(6, 300)[:, :240]
    buf = torch.full((6, 200), float("nan"))
    out = buf[:, :120]
    silu_mul(x, out=out)
    torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)
    assert torch.isnan(buf[:, 120:]).all(), "wrote outside its rows"


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_silu_mul_cross_compiles(dtype):
    from tests.kernels.aot_util import assert_cross_compiles

    assert assert_cross_compiles(SPEC, {"I": 8192, "max_T": 64, "max_S": 8}, {"x": dtype, "out": dtype}) >= 3
