"""quantize_weights (--quant int8 / int4): structure of the quantized graph, and that it quantizes the rows the kernels
read (after the merges, the GLU interleave and the rope pairing; the norm weights left out of them, as the kernels'
input norm_w), checked against the maths written here."""

import pytest
import torch

from artifact_format.onnx_io import from_onnx, to_onnx
from compiler.passes import optimize, passes_for
from tests.compiler.graph_eval import traced


def _rows_read(plain_w, traced, a, g, b) -> torch.Tensor:
    """The rows node b of the quantized graph g reads before quantization: those of node a of the unquantized build,
    whose rms_norm_linear weights are W diag(norm) (interleaved / paired rows), with the norm divided back out of the
    columns: b takes it as input norm_w, the source's own norm weight."""
    rows = plain_w[a.input("w")].double()
    if b.op == "rms_norm_linear":
        norm = b.input("norm_w")
        assert b.attr("use_norm_w") is True and norm.endswith("layernorm.weight")
        assert g.tensor(norm).shape == (rows.shape[1],)
        rows = rows / traced[norm].double()[None, :]
    return rows.float()


def _maths_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(dim=1) / 127
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


@pytest.fixture(scope="module")
def both():
    graph, weights, *_ = traced("llama")
    return optimize(graph, weights, "fp32"), optimize(graph, weights, "fp32", "int8"), weights


def test_quantized_graph_has_int8_weights_and_scales(both):
    (plain, _, _), (g, w, _), weights = both
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
    tables = [n for n in g.nodes if n.op in ("embedding", "logits")]
    assert len(tables) == 2
    for n in tables:  # the embedding table and the lm_head, int8 per vocabulary row of the source's [V, D]
        q, scale = _maths_int8(weights[next(p for p in plain.nodes if p.name == n.name).input("weight")])
        assert n.attr("quant") == "int8" and g.tensor(n.input("weight")).dtype == "i8"
        assert torch.equal(w[n.input("weight")], q)
        torch.testing.assert_close(w[n.input("weight_scale")], scale, atol=0, rtol=1e-6)
    assert set(w) == {t.name for t in g.by_kind("weight")}


def test_the_rows_quantized_are_the_unfolded_interleaved_paired_ones(both):
    # The int8 build must hold exactly the per-row int8 rounding of the rows its kernels read: merged, interleaved and
    # paired as the unquantized build's, but without the norm weight folded in (the kernel applies it to x).
    (plain, plain_w, _), (g, w, records), weights = both
    for a, b in zip(plain.nodes, g.nodes):
        if b.op in ("linear", "rms_norm_linear"):
            q, scale = _maths_int8(_rows_read(plain_w, weights, a, g, b))
            assert torch.equal(w[b.input("w")], q), b.name
            torch.testing.assert_close(w[b.input("scale")], scale, atol=0, rtol=1e-6)
    ops = [r["op"] for r in records]
    assert "fold_rms_norm" not in ops
    last_rewrite = max(i for i, op in enumerate(ops) if op in ("interleave_rows", "pair_rotary_rows"))
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
    with pytest.raises(ValueError, match="--quant int3 is not a weight scheme: use --quant none, int8, int4, gguf"):
        passes_for("int3")


# --quant int4: a tiny Llama whose K (hidden 64, intermediate 96) are multiples of 32.
INT4_MODEL = {"hidden_size": 64, "intermediate_size": 96}


def _maths_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, K] in 0..15, scale [N, K / G], min [N, K / G]) from the definition: per group of G consecutive k of a
    row, scale = (max - min) / 15, q = round((w - min) / scale) clamped to [0, 15]."""
    N, K = w.shape
    wg = w.double().reshape(N, K // group, group)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    scale = (hi - lo) / 15
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).reshape(N, K)
    return q, scale, lo


@pytest.fixture(scope="module")
def int4_both():
    from artifact_format.graph import Limits
    from compiler.trace import trace
    from tests.compiler.graph_eval import tiny_model

    config, tensors, _ = tiny_model("llama", **INT4_MODEL)
    graph, weights = trace(config, tensors, "fp32", Limits(max_seq_len=32, max_batch=2, max_num_tokens=64,
                                                           block_size=4))
    return graph, weights, optimize(graph, weights, "fp32"), optimize(graph, weights, "fp32", "int4", 32)


def test_int4_graph_has_packed_weights_and_group_scales(int4_both):
    _, weights, (plain, _, _), (g, w, records) = int4_both
    assert [n.op for n in g.nodes] == [n.op for n in plain.nodes]
    matmuls = [n for n in g.nodes if n.op in ("linear", "rms_norm_linear")]
    assert len(matmuls) == 8
    for n in matmuls:
        q, s = g.tensor(n.input("w")), g.tensor(n.input("scale"))
        K = plain.tensor(next(p for p in plain.nodes if p.name == n.name).input("w")).shape[1]
        assert n.attr("quant") == "int4" and n.attr("group_size") == 32
        assert q.dtype == "u8" and q.shape == (q.shape[0], K // 2) and w[q.name].dtype == torch.uint8
        assert s.dtype == "fp32" and s.shape == (q.shape[0], K // 32, 2) and w[s.name].dtype == torch.float32
    for n in g.nodes:
        if n.op in ("embedding", "logits"):  # the tables too, grouped along D
            src = weights[next(p for p in plain.nodes if p.name == n.name).input("weight")]
            q, scale, lo = _maths_int4(src, 32)
            packed = w[n.input("weight")].long()
            assert n.attr("quant") == "int4" and n.attr("group_size") == 32
            assert torch.equal(packed & 15, q[:, 0::2].long()) and torch.equal(packed >> 4, q[:, 1::2].long())
            torch.testing.assert_close(w[n.input("weight_scale")].double(), torch.stack([scale, lo], dim=2),
                                       atol=0, rtol=1e-6)
    quantized = [r for r in records if r["op"] == "quantize_int4"]
    assert len(quantized) == 10 and all(r["group_size"] == 32 for r in quantized)


def test_int4_nibbles_and_group_scales_of_the_unfolded_interleaved_paired_rows(int4_both):
    # The packed bytes must hold this test's own rounding of the rows the kernels read (interleaved, paired, the norm
    # weight not folded in): k = 2j in the low nibble of byte j, k = 2j + 1 in the high one.
    _, weights, (plain, plain_w, _), (g, w, records) = int4_both
    for a, b in zip(plain.nodes, g.nodes):
        if b.op not in ("linear", "rms_norm_linear"):
            continue
        q, scale, lo = _maths_int4(_rows_read(plain_w, weights, a, g, b), 32)
        packed = w[b.input("w")].long()
        assert torch.equal(packed & 15, q[:, 0::2].long()), b.name
        assert torch.equal(packed >> 4, q[:, 1::2].long()), b.name
        stored = w[b.input("scale")].double()
        torch.testing.assert_close(stored[..., 0], scale, atol=0, rtol=1e-6)
        torch.testing.assert_close(stored[..., 1], lo, atol=0, rtol=1e-6)
    ops = [r["op"] for r in records]
    assert "fold_rms_norm" not in ops
    last_rewrite = max(i for i, op in enumerate(ops) if op in ("interleave_rows", "pair_rotary_rows"))
    assert ops.index("quantize_int4") > last_rewrite


def test_int4_graph_and_weights_round_trip(tmp_path, int4_both):
    from compiler.fileio import save_tensors
    from runtime.safetensors_file import check_against, read_header

    g, w, _ = int4_both[3]
    assert from_onnx(to_onnx(g)) == g
    save_tensors(tmp_path / "w.safetensors", dict(sorted(w.items())))
    header = read_header(tmp_path / "w.safetensors")
    assert check_against(header, {t.name: (t.dtype, t.shape) for t in g.by_kind("weight")}) is None


def test_int4_dequantized_checkpoint_is_the_source_up_to_rounding(int4_both):
    # compiler/dequant.py walks int4 weights back to the source's names, close to the source (the e2e test checks
    # the exact values, through transformers).
    from compiler.dequant import dequantized_checkpoint

    graph, weights, _, (g, w, records) = int4_both
    rows = {n: t.shape[0] for n, t in weights.items() if t.dim()}
    back = dequantized_checkpoint(records, w, rows)
    assert len(back) == 16  # q, k, v, o, gate, up, down of two layers, the embedding table and the lm_head
    for name, value in back.items():
        assert value.shape == weights[name].shape, name
        # No norm is folded in: the 4-bit rounding of Gaussian rows is ~8% of their norm at groups of 32.
        assert (value - weights[name]).norm() < 0.12 * weights[name].norm(), name


def test_int4_group_size_not_dividing_k_is_one_line(int4_both):
    graph, weights, *_ = int4_both
    with pytest.raises(ValueError, match=r"--quant int4 --group-size 64: \S*down\S* \(node \S*down\S*\) has K = 96, "
                                         r"not a multiple of 64: use --group-size 32, or --quant int8"):
        optimize(graph, weights, "fp32", "int4", 64)


@pytest.mark.parametrize("quant,group,message", [
    ("int8", 32, "--group-size 32 only applies to --quant int4"),
    ("none", 128, "--group-size 128 only applies to --quant int4"),
    ("int4", 48, "--group-size 48 is not supported: use one of 32, 64, 128"),
])
def test_group_size_errors_are_one_line(quant, group, message):
    with pytest.raises(ValueError, match=message):
        passes_for(quant, group)


@pytest.mark.parametrize("args,message", [
    (["--group-size", "32"], "error: --group-size 32 only applies to --quant int4 (got --quant none): drop it or add "
                             "--quant int4"),
    (["--quant", "int4", "--group-size", "16"], "error: --group-size 16 is not supported: use one of 32, 64, 128"),
    (["--quant", "int4", "--group-size", "128", "--no-reference"],
     "error: --quant int4 --group-size 128: model.embed_tokens.weight (node embed_tokens) has D = 64, not a multiple "
     "of 128: use --group-size 32 or 64, or --quant int8"),
])
def test_cli_refuses_bad_group_sizes_in_one_line(tmp_path, args, message):
    from click.testing import CliRunner

    from compiler.cli import main

    result = CliRunner().invoke(main, ["compile", "tiny-llama", "--out", str(tmp_path / "a"), "--dtype", "fp32",
                                       "--target", "cuda:90", "--no-autotune", *args])
    assert result.exit_code != 0
    # One error line (above it at most the progress bar, which a terminal redraws in place).
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert errors == [message], result.output
    assert not (tmp_path / "a").exists()
