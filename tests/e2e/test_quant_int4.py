"""`compiler compile tiny-llama --quant int4 --group-size 32` (and tiny-gemma2, whose norms scale by 1 + w) against
HF transformers running the same int4 model.

The reference side is built here from the definition, not from the artifact or the compiler: transformers loads the
preset's own files, then every linear weight W (q, k, v, o, gate, up, down) is replaced by its int4 round trip as
the artifact must hold it: each group of 32 consecutive k of a row of W itself quantized asymmetrically
(scale = (max - min) / 15, q = round((W - min) / scale) in [0, 15]) and dequantized (q * scale + min), the norm
weights left to transformers' norms (the artifact's kernels apply them to x). Row permutations (rope pairing, gate/up
interleave) and merges move whole rows, so they change no group and none of them appears here. fp32 on both sides:
logits to 1e-4 relative error, greedy tokens identical over 32 steps, on the torch and interpret backends;
`runtime verify` passes on the artifact's own dequantized reference.
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
    check_norm_in_kernel,
    check_verify,
    quantize_like_the_artifact,
)

NAMES = ("tiny-llama", "tiny-gemma2")
GROUP = 32
BACKENDS = ("torch", "interpret")


def _int4_round_trip(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    wg = w.reshape(N, K // GROUP, GROUP)
    lo, hi = wg.amin(dim=2, keepdim=True), wg.amax(dim=2, keepdim=True)
    scale = (hi - lo) / 15
    return (torch.round((wg - lo) / scale).clamp(0, 15) * scale + lo).reshape(N, K)


@pytest.fixture(scope="module", params=NAMES)
def quantized(request, tmp_path_factory):
    from compiler.build import build

    name = request.param
    out = tmp_path_factory.mktemp("quant4") / f"{name}-int4"
    build(name, out, targets=["cuda:90"], dtype="fp32", autotune=False, quant="int4", group_size=GROUP,
          **TINY_LIMITS)
    model = hf_model(name)
    quantize_like_the_artifact(model, _int4_round_trip)
    return out, model, name


def test_artifact_holds_packed_int4_weights(quantized):
    path, model, name = quantized
    artifact = load_artifact(path, check_hashes=False)
    nodes = artifact.graph.nodes
    matmuls = [n for n in nodes if n.op in ("linear", "rms_norm_linear")]
    tables = [n for n in nodes if n.op in ("embedding", "logits")]
    assert len(matmuls) == 8 and len(tables) == 2
    assert all(n.attr("quant") == "int4" and n.attr("group_size") == GROUP for n in matmuls + tables)
    roles = {n.name: ("w", "scale") if n in matmuls else ("weight", "weight_scale") for n in matmuls + tables}
    header = artifact.safetensors_header("weights.safetensors")
    stored: dict[str, int] = {}  # quantized tensor -> its bytes (nibbles, and 8 bytes of (scale, min) per group)
    for n in matmuls + tables:
        w_name, s_name = (n.input(r) for r in roles[n.name])
        w, s = header[w_name], header[s_name]
        assert w["dtype"] == "U8" and s["dtype"] == "F32"
        N, half = w["shape"]
        assert s["shape"] == [N, 2 * half // GROUP, 2]
        stored[w_name], stored[s_name] = N * half, 4 * N * (2 * half // GROUP) * 2
    embedding, logits = (next(n for n in tables if n.op == op) for op in ("embedding", "logits"))
    tied = name == "tiny-gemma2"
    # A tied table is quantized once: both kernels read the very same tensors.
    assert (embedding.input("weight") == logits.input("weight")) == tied
    assert (embedding.input("weight_scale") == logits.input("weight_scale")) == tied
    assert embedding.attr("out_dtype") == "fp32"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["quant"] == "int4" and manifest["model"]["quant_group_size"] == GROUP
    assert manifest["reference"]["source"] == "transformers on the dequantized weights"
    records = [r for r in manifest["model"]["transforms"] if r["op"] == "quantize_int4"]
    assert len(records) == (9 if tied else 10) and all(r["group_size"] == GROUP for r in records)
    check_norm_in_kernel(artifact)
    # runtime inspect: the schemes, and per decode step every weight once but the embedding table (read only as
    # the lm_head when tied): half a byte per quantized element, 8 bytes of (scale, min) per group, fp32 the rest.
    weights = describe(artifact)["weights"]
    assert weights["schemes"] == {f"int4/g{GROUP}": 8}
    assert weights["tables"] == {"embedding": f"int4/g{GROUP}", "logits": f"int4/g{GROUP}"}
    unread = {embedding.input(r) for r in ("weight", "weight_scale")} - {logits.input(r) for r in
                                                                         ("weight", "weight_scale")}
    others = sum(4 * torch.Size(t["shape"]).numel() for n, t in header.items() if n not in stored)
    assert weights["decode_bytes"] == sum(b for n, b in stored.items() if n not in unread) + others
    # Parameters count two per packed byte and none for the (scale, min) pairs: the model's own count (every norm
    # weight stays, applied to x), plus the rope's cos_sin table the artifact stores.
    cos_sin = sum(torch.Size(t["shape"]).numel() for n, t in header.items() if "cos_sin" in n)
    hf = {n: p.numel() for n, p in model.named_parameters()}
    assert weights["parameters"] - cos_sin == sum(hf.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_logits_match_transformers_on_dequantized_weights(quantized, backend):
    path, model, name = quantized
    check_logits(path, model, name, backend, seed=400)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_greedy_matches_transformers_on_dequantized_weights(quantized, backend):
    check_greedy(*quantized[:2], backend, seed=401)


def test_verify_uses_the_dequantized_reference(quantized):
    check_verify(quantized[0])
