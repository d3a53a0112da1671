import pytest
import torch

from kernels.rms_norm_gated import SPEC, configs, reference, rms_norm_gated

# (T, D, n_groups): groups of 64, 40, 72, 1000 and 250 channels; one row and many rows.
CASES = [(1, 64, 1), (5, 120, 3), (37, 576, 8), (3, 1000, 1), (4, 1000, 4)]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]


def _inputs(T: int, D: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(T * 1000 + D)
    x = torch.randn(T, D, generator=g).to(dtype)
    z = (2 * torch.randn(T, D, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    return x, z, w


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("T,D,n_groups", CASES)
def test_rms_norm_gated_matches_reference(T, D, n_groups, dtype, atol, rtol):
    x, z, w = _inputs(T, D, dtype)
    out = rms_norm_gated(x, z, w, 1e-6, n_groups, out=torch.full((T, D), float("nan"), dtype=dtype))
    torch.testing.assert_close(out, reference(x, z, w, eps=1e-6, n_groups=n_groups), atol=atol, rtol=rtol)


def test_reference_normalises_each_group_on_its_own():
    x, z, w = (t.double() for t in _inputs(3, 96, torch.float32))
    h = x * z * torch.sigmoid(z)
    expected = torch.empty_like(h)
    for lo in range(0, 96, 24):
        part = h[:, lo:lo + 24]
        expected[:, lo:lo + 24] = part / torch.sqrt((part * part).mean(-1, keepdim=True) + 1e-5) * w[lo:lo + 24]
    torch.testing.assert_close(reference(x, z, w, eps=1e-5, n_groups=4), expected, atol=1e-5, rtol=1e-5)
    # Groups change the answer: a whole-row norm is not the same op.
    assert not torch.allclose(reference(x, z, w, eps=1e-5, n_groups=1), expected, atol=1e-3)


@pytest.mark.parametrize("config", configs({"D": 1000, "n_groups": 1}), ids=str)
def test_every_config(config):
    x, z, w = _inputs(3, 1000, torch.float32)
    out = rms_norm_gated(x, z, w, 1e-6, 1, out=torch.full((3, 1000), float("nan")), config=config)
    torch.testing.assert_close(out, reference(x, z, w, eps=1e-6, n_groups=1), atol=1e-5, rtol=1e-5)


def test_strided_rows():
    x = torch.randn(6, 200)[:, :160]
    z = torch.randn(6, 170)[:, :160]
    w = torch.randn(160)
    out = rms_norm_gated(x, z, w, 1e-5, 2, out=torch.full((6, 180), float("nan"))[:, :160])
    torch.testing.assert_close(out, reference(x, z, w, eps=1e-5, n_groups=2), atol=1e-5, rtol=1e-5)


def test_groups_must_divide_width():
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match="n_groups=3"):
        rms_norm_gated(x, x, torch.ones(100), 1e-5, 3)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_rms_norm_gated_cross_compiles(dtype):
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {"D": 4096, "eps": 1e-5, "n_groups": 8, "max_T": 64, "max_S": 8}
    assert assert_cross_compiles(SPEC, meta, {"x": dtype, "z": dtype, "w": dtype, "out": dtype}) >= 3
