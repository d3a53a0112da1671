"""`compiler compile tiny-llama --quant int4 --group-size 32` against HF transformers running the same int4 model.

The reference side is built here from the definition, not from the artifact or the compiler: transformers loads the
preset's own files, then every linear weight W (q, k, v, o, gate, up, down) is replaced by its int4 round trip as
the artifact must hold it. The norm before q/k/v (and gate/up) is folded into W first (W' = W diag(g)), each group of
32 consecutive k of a row quantized asymmetrically (scale = (max - min) / 15, q = round((W' - min) / scale) in
[0, 15]), dequantized (q * scale + min) and divided by g again, which transformers' norm then multiplies back in.
Row permutations (rope pairing, gate/up interleave) and merges move whole rows, so they change no group and none of
them appears here. fp32 on both sides: logits to 1e-4 relative error, greedy tokens identical over 32 steps, on the
torch and interpret backends; `runtime verify` passes on the artifact's own dequantized reference.
"""

from __future__ import annotations

import json

import pytest
import torch

from runtime.artifact import describe, load_artifact
from tests.e2e.conftest import TINY_LIMITS, hf_model
from tests.e2e.quant_reference import (
    check_greedy,
    check_logits,
    check_verify,
    quantize_like_the_artifact,
)

NAME = "tiny-llama"
GROUP = 32
BACKENDS = ("torch", "interpret")


def _int4_round_trip(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    wg = w.reshape(N, K // GROUP, GROUP)
    lo, hi = wg.amin(dim=2, keepdim=True), wg.amax(dim=2, keepdim=True)
    scale = (hi - lo) / 15
    return (torch.round((wg - lo) / scale).clamp(0, 15) * scale + lo).reshape(N, K)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from compiler.build import build

    out = tmp_path_factory.mktemp("quant4") / "tiny-llama-int4"
    build(NAME, out, targets=["cuda:90"], dtype="fp32", autotune=False, quant="int4", group_size=GROUP,
          **TINY_LIMITS)
    model = hf_model(NAME)
    quantize_like_the_artifact(model, _int4_round_trip)
    return out, model


def test_artifact_holds_packed_int4_linears(quantized):
    path, _ = quantized
    artifact = load_artifact(path, check_hashes=False)
    matmuls = [n for n in artifact.graph.nodes if n.op in ("linear", "rms_norm_linear")]
    assert len(matmuls) == 8 and all(n.attr("quant") == "int4" and n.attr("group_size") == GROUP for n in matmuls)
    header = artifact.safetensors_header("weights.safetensors")
    packed_bytes = 0
    for n in matmuls:
        w, s = header[n.input("w")], header[n.input("scale")]
        assert w["dtype"] == "U8" and s["dtype"] == "F32"
        N, half = w["shape"]
        assert s["shape"] == [N, 2 * half // GROUP, 2]
        packed_bytes += N * half + 4 * N * (2 * half // GROUP) * 2
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["quant"] == "int4" and manifest["model"]["quant_group_size"] == GROUP
    assert manifest["reference"]["source"] == "transformers on the dequantized weights"
    records = [r for r in manifest["model"]["transforms"] if r["op"] == "quantize_int4"]
    assert len(records) == 8 and all(r["group_size"] == GROUP for r in records)
    # runtime inspect: half a byte per weight element, plus 8 bytes of (scale, min) per group, plus the rest.
    weights = describe(artifact)["weights"]
    assert weights["schemes"] == {f"int4/g{GROUP}": 8}
    others = sum(4 * torch.Size(t["shape"]).numel() for name, t in header.items()
                 if name not in {n.input(r) for n in matmuls for r in ("w", "scale")}
                 and not any(n.op == "embedding" and n.input("weight") == name for n in artifact.graph.nodes))
    embedding_is_lm_head = any(n.op == "logits" and n.input("weight") in
                               {e.input("weight") for e in artifact.graph.nodes if e.op == "embedding"}
                               for n in artifact.graph.nodes)
    assert not embedding_is_lm_head  # tiny-llama is untied: the embedding table is not read per step
    assert weights["decode_bytes"] == packed_bytes + others
    # Parameters count two per packed byte and none for the (scale, min) pairs: the model's own count, less the two
    # norm weights per layer folded into the matmuls, plus the rope's cos_sin table the artifact stores.
    cos_sin = sum(torch.Size(t["shape"]).numel() for name, t in header.items() if "cos_sin" in name)
    hf = {name: p.numel() for name, p in quantized[1].named_parameters()}
    folded = sum(n for name, n in hf.items() if "input_layernorm" in name or "post_attention_layernorm" in name)
    assert weights["parameters"] - cos_sin == sum(hf.values()) - folded


@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_logits_match_transformers_on_dequantized_weights(quantized, backend):
    check_logits(*quantized, NAME, backend, seed=400)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_greedy_matches_transformers_on_dequantized_weights(quantized, backend):
    check_greedy(*quantized, backend, seed=401)


def test_verify_uses_the_dequantized_reference(quantized):
    check_verify(quantized[0])
