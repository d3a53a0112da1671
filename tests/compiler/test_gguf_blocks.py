"""The repack of GGUF blocks into the kernels' grouped layouts is exact: gguf's own dequantization is the reference."""

from __future__ import annotations

import pytest
import torch

from compiler.frontends.gguf_blocks import NATIVE_TYPES, repack
from kernels.weight_quant import dequantize, scheme_of
from tests.gguf_synth import dequantized, random_blocks

SCHEMES = {"Q4_0": ("int4", 32), "Q4_1": ("int4", 32), "Q4_K": ("int4", 32), "Q5_K": ("int8_group", 32),
           "Q6_K": ("int8_group", 16), "Q8_0": ("int8_group", 32)}


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_repack_is_gguf_dequantize(type_name, rows):
    cols = 512 if type_name.endswith("_K") else 96
    data = random_blocks(type_name, rows, cols, seed=rows)
    scheme, w, scale = repack(type_name, data, rows, cols)
    assert (scheme, *scheme_of(w, scale)[1:]) == SCHEMES[type_name] and scheme_of(w, scale)[0] == scheme
    assert scale.dtype == torch.float32 and scale.shape == (rows, cols // SCHEMES[type_name][1], 2)
    want = torch.from_numpy(dequantized(type_name, data))
    assert torch.equal(dequantize(w, scale), want)  # bit for bit, not merely close
