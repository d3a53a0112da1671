import pytest
import torch

from kernels.embedding import SPEC, configs, embedding, reference

# (T, V, D): one token, awkward widths, more tokens than vocabulary rows (ids repeat).
CASES = [(1, 10, 64), (5, 37, 123), (40, 17, 576), (3, 1000, 2500)]
DTYPES = [torch.float32, torch.float16]


def _inputs(T: int, V: int, D: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(T * 1000 + V + D)
    ids = torch.randint(0, V, (T,), generator=g, dtype=torch.int32)
    weight = torch.randn(V, D, generator=g).to(dtype)
    return ids, weight, torch.full((T, D), float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,V,D", CASES)
def test_embedding_matches_reference(T, V, D, dtype):
    ids, weight, out = _inputs(T, V, D, dtype)
    embedding(ids, weight, out=out)
    # A gather is a copy: exact in every dtype.
    torch.testing.assert_close(out, reference(ids, weight), atol=0, rtol=0)


def test_reference_picks_rows():
    weight = torch.arange(12.0).view(4, 3)
    torch.testing.assert_close(reference(torch.tensor([3, 0, 3], dtype=torch.int32), weight),
                               torch.tensor([[9.0, 10, 11], [0, 1, 2], [9, 10, 11]]))


def test_padding_ids_copy_row_zero():
    ids, weight, out = _inputs(6, 50, 96, torch.float32)
    ids[3:] = 0
    embedding(ids, weight, out=out)
    torch.testing.assert_close(out[3:], weight[0].expand(3, 96), atol=0, rtol=0)
    torch.testing.assert_close(out[:3], weight[ids[:3].long()], atol=0, rtol=0)


def test_out_of_range_ids_give_zero_rows():
    ids, weight, out = _inputs(4, 50, 96, torch.float32)
    ids[1], ids[2] = 50, -1
    embedding(ids, weight, out=out)
    assert (out[1:3] == 0).all()
    torch.testing.assert_close(out[[0, 3]], weight[ids[[0, 3]].long()], atol=0, rtol=0)


@pytest.mark.parametrize("config", configs({"V": 1000, "D": 2500}), ids=str)
def test_every_config(config):
    ids, weight, out = _inputs(3, 1000, 2500, torch.float32)
    embedding(ids, weight, out=out, config=config)
    torch.testing.assert_close(out, reference(ids, weight), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_embedding_cross_compiles(dtype):
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {"V": 49152, "D": 2048, "max_T": 64, "max_S": 8}
    assert assert_cross_compiles(SPEC, meta, {"ids": "i32", "weight": dtype, "out": dtype}) >= 3
