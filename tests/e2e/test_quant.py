"""`compiler compile tiny-llama --quant int8` (and tiny-gemma2, whose norms scale by 1 + w) against HF transformers
running the same int8 model.

The reference side is built here from the definition, not from the artifact or the compiler: transformers loads the
preset's own files, then every linear weight W (q, k, v, o, gate, up, down) is replaced by its int8 round trip as
the artifact must hold it: W itself quantized per row (scale = max|W| / 127, q = round(W / scale) in [-127, 127]) and
dequantized, the norm weights left to transformers' norms (the artifact's kernels apply them to x). Row permutations
(rope pairing, gate/up interleave) and merges do not change a per-row quantization, so none of them appears here.
fp32 on both sides: logits to 1e-4 relative error, greedy tokens identical over 32 steps, on the torch and interpret
backends.
"""

from __future__ import annotations

import json

import pytest
import torch

from runtime.artifact import load_artifact
from runtime.engine import load
from tests.e2e.conftest import (
    TINY_LIMITS,
    TINY_PRESETS,
    first_difference,
    greedy,
    hf_greedy,
    hf_logits,
    hf_model,
    random_prompt,
    rel_err,
)
from tests.e2e.quant_reference import (
    GEN_TOKENS,
    check_greedy,
    check_logits,
    check_norm_in_kernel,
    check_verify,
    quantize_like_the_artifact,
)

# tiny-llama, and tiny-gemma2 for the (1 + w) norms the kernels then apply to x.
NAMES = ("tiny-llama", "tiny-gemma2")
BACKENDS = ("torch", "interpret")


def _int8_round_trip(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


@pytest.fixture(scope="module", params=NAMES)
def quantized(request, tmp_path_factory):
    from compiler.build import build

    name = request.param
    out = tmp_path_factory.mktemp("quant") / f"{name}-int8"
    build(name, out, targets=["cuda:90"], dtype="fp32", autotune=False, quant="int8", **TINY_LIMITS)
    model = hf_model(name)
    quantize_like_the_artifact(model, _int8_round_trip)
    return out, model, name


def test_artifact_holds_int8_linears(quantized):
    path, _, _ = quantized
    artifact = load_artifact(path, check_hashes=False)
    matmuls = [n for n in artifact.graph.nodes if n.op in ("linear", "rms_norm_linear")]
    assert len(matmuls) == 8 and all(n.attr("quant") == "int8" for n in matmuls)
    header = artifact.safetensors_header("weights.safetensors")
    for n in matmuls:
        assert header[n.input("w")]["dtype"] == "I8" and header[n.input("scale")]["dtype"] == "F32"
    check_norm_in_kernel(artifact)
    for n in artifact.graph.nodes:  # the embedding table and the lm_head too, int8 per vocabulary row
        if n.op in ("embedding", "logits"):
            assert n.attr("quant") == "int8" and header[n.input("weight")]["dtype"] == "I8"
            assert header[n.input("weight_scale")]["shape"] == [header[n.input("weight")]["shape"][0]]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["quant"] == "int8"
    assert manifest["reference"]["source"] == "transformers on the dequantized weights"


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_logits_match_transformers_on_dequantized_weights(quantized, backend):
    path, model, name = quantized
    check_logits(path, model, name, backend, seed=300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_greedy_matches_transformers_on_dequantized_weights(quantized, backend):
    check_greedy(*quantized[:2], backend, seed=306)  # a prompt on which tiny-gemma2 says more than one token


def test_verify_uses_the_dequantized_reference(quantized):
    check_verify(quantized[0])


@pytest.mark.parametrize("name", [p for p in TINY_PRESETS if p not in NAMES])
def test_int8_every_family_matches_transformers_on_dequantized_weights(name, tmp_path):
    """Every other tiny family with --quant int8 on the torch backend: logits and 32 greedy tokens as transformers
    gives on the same int8 round trip of its weights (tiny-llama and tiny-gemma2 run on interpret too, above)."""
    from compiler.build import build

    out = tmp_path / f"{name}-int8"
    build(name, out, targets=["cuda:90"], dtype="fp32", autotune=False, quant="int8", reference=False,
          **TINY_LIMITS)
    model = hf_model(name)
    quantize_like_the_artifact(model, _int8_round_trip)
    eng = load(out, backend="torch")
    prompt = random_prompt(model.config.vocab_size, 11, seed=302)
    ref = hf_logits(model, prompt)
    got = eng.logits(prompt)
    err = rel_err(got, ref)
    assert err <= 1e-4, f"{name}: relative error {err:.2e}"
    assert rel_err(got, hf_logits(hf_model(name), prompt)) > 10 * max(err, 1e-7), "the weights were not quantized"
    prompt = random_prompt(model.config.vocab_size, 5, seed=303)
    expected = hf_greedy(model, prompt, GEN_TOKENS)
    tokens = eng.generate([prompt], greedy(GEN_TOKENS))[0].token_ids
    assert tokens == expected, f"{name}: first difference at token {first_difference(tokens, expected)}"
