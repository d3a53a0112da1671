"""quantize_weights (--quant int8): structure of the quantized graph, and that it quantizes the rows the kernels read
(after the norm fold, the merges, the GLU interleave and the rope pairing), checked against the maths written here."""

import pytest
import torch

from artifact_format.onnx_io import from_onnx, to_onnx
from compiler.passes import optimize, passes_for
from tests.compiler.graph_eval import traced


def _maths_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(dim=1) / 127
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


@pytest.fixture(scope="module")
def both():
    graph, weights, *_ = traced("llama")
    return optimize(graph, weights, "fp32"), optimize(graph, weights, "fp32", "int8")


def test_quantized_graph_has_int8_weights_and_scales(both):
    (plain, _, _), (g, w, _) = both
    assert [n.op for n in g.nodes] == [n.op for n in plain.nodes]  # the same kernels, five per layer
    matmuls = [n for n in g.nodes if n.op in ("linear", "rms_norm_linear")]
    assert len(matmuls) == 8
    for n in matmuls:
        q, s = g.tensor(n.input("w")), g.tensor(n.input("scale"))
        assert n.attr("quant") == "int8" and q.dtype == "i8" and s.dtype == "fp32" and s.shape == (q.shape[0],)
        assert w[q.name].dtype == torch.int8 and w[s.name].dtype == torch.float32
        assert int(w[q.name].abs().max()) <= 127
        if n.attr("has_bias"):
            assert g.tensor(n.input("bias")).dtype == "fp32"
    for n in g.nodes:
        if n.op in ("embedding", "logits"):  # not quantized in this slice
            assert g.tensor(n.input("weight")).dtype == "fp32"
    assert set(w) == {t.name for t in g.by_kind("weight")}


def test_the_rows_quantized_are_the_folded_interleaved_paired_ones(both):
    # The unquantized build's matmul weights are W diag(g), interleaved / paired: the int8 build must hold exactly
    # their per-row int8 rounding, so every fold and permutation happened before quantization.
    (plain, plain_w, _), (g, w, records) = both
    for a, b in zip(plain.nodes, g.nodes):
        if b.op in ("linear", "rms_norm_linear"):
            q, scale = _maths_int8(plain_w[a.input("w")])
            assert torch.equal(w[b.input("w")], q), b.name
            torch.testing.assert_close(w[b.input("scale")], scale, atol=0, rtol=0)
    ops = [r["op"] for r in records]
    last_rewrite = max(i for i, op in enumerate(ops) if op in ("fold_rms_norm", "interleave_rows", "pair_rotary_rows"))
    assert ops.index("quantize_int8") > last_rewrite


def test_quantized_graph_round_trips_through_onnx(both):
    g = both[1][0]
    assert from_onnx(to_onnx(g)) == g


def test_int8_weights_round_trip_through_safetensors(tmp_path, both):
    from compiler.fileio import save_tensors
    from runtime.safetensors_file import check_against, read_header

    g, w, _ = both[1]
    save_tensors(tmp_path / "w.safetensors", dict(sorted(w.items())))
    header = read_header(tmp_path / "w.safetensors")
    assert check_against(header, {t.name: (t.dtype, t.shape) for t in g.by_kind("weight")}) is None


def test_unsupported_scheme_is_one_clear_line():
    with pytest.raises(ValueError, match="--quant int4 is not supported yet: use --quant none or int8"):
        passes_for("int4")
