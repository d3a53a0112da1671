import pytest
import torch

from kernels.rms_norm import reference, rms_norm

CASES = [(1, 64), (5, 123), (37, 576), (3, 1000)]


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)])
@pytest.mark.parametrize("T,D", CASES)
def test_rms_norm_matches_reference(T, D, dtype, atol, rtol):
    g = torch.Generator().manual_seed(T * 1000 + D)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    out = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, reference(x, w, 1e-6), atol=atol, rtol=rtol)


def test_rms_norm_row_stride():
    x = torch.randn(7, 200)[:, :150]
    w = torch.randn(150)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_rms_norm_cross_compiles(dtype):
    from kernels.rms_norm import SPEC
    from tests.kernels.aot_util import assert_cross_compiles

    assert assert_cross_compiles(SPEC, {"D": 576, "eps": 1e-5, "max_T": 64, "max_S": 8},
                                 {"x": dtype, "w": dtype, "out": dtype}) >= 3
