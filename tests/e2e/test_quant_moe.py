"""`compiler compile tiny-qwen2-moe --quant int8` (routed experts beside a shared one) and an int4 Qwen3-MoE against
HF transformers running the same quantized model: the experts are quantized (expert by expert, each matrix as a
linear's weight), the routers not. (tiny-mixtral and tiny-qwen3-moe --quant int8 run on the torch backend in
test_quant.py.)

The reference side is built here from the schemes' definitions (tests/e2e/quant_reference.py), not from the artifact
or the compiler. The int4 model is tiny-qwen3-moe's config with expert and dense MLPs of 64 (multiples of the group
size 32; the tiny presets' 48 and 40 are not, nor tiny-qwen2-moe's shared expert of 56), written to a temporary HF
directory by the random-model writer. fp32 on both sides: logits to 1e-4 relative error, greedy tokens identical over
32 steps, on the torch and interpret backends (prefill chunks of 4 tokens take the grouped expert GEMM, decode steps
the one-token expert GEMVs).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime.artifact import load_artifact
from runtime.engine import load
from tests.e2e.conftest import (
    TINY_LIMITS,
    first_difference,
    greedy,
    hf_greedy,
    hf_logits,
    random_prompt,
    rel_err,
)
from tests.e2e.quant_reference import GEN_TOKENS, check_verify, quantize_like_the_artifact
from tests.e2e.test_quant import _int8_round_trip

BACKENDS = ("torch", "interpret")
GROUP = 32


def _int4_round_trip(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    wg = w.reshape(N, K // GROUP, GROUP)
    lo, hi = wg.amin(dim=2, keepdim=True), wg.amax(dim=2, keepdim=True)
    scale = (hi - lo) / 15
    return (torch.round((wg - lo) / scale).clamp(0, 15) * scale + lo).reshape(N, K)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, tmp_path_factory):
    """(artifact, HF model on the rounded weights, HF model as the source holds it, scheme)."""
    from compiler.build import build
    from compiler.frontends.presets import PRESETS, preset_dir
    from compiler.frontends.random_model import write_random_model

    scheme = request.param
    root = tmp_path_factory.mktemp(f"quant-moe-{scheme}")
    if scheme == "int8":
        source = preset_dir("tiny-qwen2-moe")
    else:
        spec = PRESETS["tiny-qwen3-moe"].random
        spec = dataclasses.replace(spec, config={**spec.config, "moe_intermediate_size": 64, "intermediate_size": 64})
        source = root / "qwen3-moe-64"
        write_random_model(spec, source)
    out = root / "artifact"
    build(str(source), out, targets=["cuda:90"], dtype="fp32", autotune=False, quant=scheme,
          group_size=GROUP if scheme == "int4" else None, reference=scheme == "int8", **TINY_LIMITS)
    model = _hf(source)
    quantize_like_the_artifact(model, _int8_round_trip if scheme == "int8" else _int4_round_trip)
    return out, model, _hf(source), scheme


def test_experts_are_quantized_and_routers_are_not(quantized):
    path, model, _, scheme = quantized
    artifact = load_artifact(path, check_hashes=False)
    header = artifact.safetensors_header("weights.safetensors")
    nodes = [n for n in artifact.graph.nodes if n.op == "moe"]
    assert nodes and all(n.attr("quant") == scheme for n in nodes)
    E = model.config.num_experts
    for n in nodes:
        assert header[n.input("router")]["dtype"] == "F32"
        for w, s in (("w13", "w13_scale"), ("w2", "w2_scale")):
            q, scale = header[n.input(w)], header[n.input(s)]
            E_, N, K = q["shape"]
            assert E_ == E and scale["dtype"] == "F32"
            if scheme == "int8":
                assert q["dtype"] == "I8" and scale["shape"] == [E, N]
            else:
                assert q["dtype"] == "U8" and scale["shape"] == [E, N, 2 * K // GROUP, 2]
    # runtime inspect counts parameters, not stored elements: two per packed byte, none for scales (the model's own
    # count plus the rope's cos_sin table); a decode step of one token reads top_k of E experts, scales included.
    from runtime.artifact import describe
    from runtime.bench import decode_weight_bytes

    cos_sin = sum(torch.Size(t["shape"]).numel() for n, t in header.items() if "cos_sin" in n)
    assert describe(artifact)["weights"]["parameters"] - cos_sin == sum(p.numel() for p in model.parameters())
    nbytes = lambda names: sum(torch.Size(header[n]["shape"]).numel() * (4 if header[n]["dtype"] == "F32" else 1)
                               for n in names)
    experts = {n.input(r) for n in nodes for r in ("w13", "w2", "w13_scale", "w2_scale")}
    skipped = sum(nbytes({n.input(r) for r in ("w13", "w2", "w13_scale", "w2_scale")}) * (E - n.attr("top_k")) // E
                  for n in nodes)
    embedding = next(n for n in artifact.graph.nodes if n.op == "embedding")
    read = set(header) - {embedding.input("weight"), embedding.input("weight_scale")}
    assert experts <= read and decode_weight_bytes(artifact.graph) == nbytes(read) - skipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_moe_logits_match_transformers(quantized, backend):
    path, model, source, _ = quantized
    prompt = random_prompt(model.config.vocab_size, 11, seed=500)
    ref = hf_logits(model, prompt)
    out = load(path, backend=backend).logits(prompt)
    err = rel_err(out, ref)
    assert err <= 1e-4, f"{backend}: relative error {err:.2e}"
    assert (out.argmax(-1) == ref.argmax(-1).numpy()).all()
    assert rel_err(out, hf_logits(source, prompt)) > 10 * max(err, 1e-7), "the experts were not quantized"


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_moe_greedy_matches_transformers(quantized, backend):
    path, model, _, _ = quantized
    prompt = random_prompt(model.config.vocab_size, 5, seed=501)
    ref = hf_greedy(model, prompt, GEN_TOKENS)
    assert len(set(ref)) >= 8, ref
    out = load(path, backend=backend).generate([prompt], greedy(GEN_TOKENS))[0]
    assert out.token_ids == ref, f"{backend}: first difference at token {first_difference(out.token_ids, ref)}"


def test_verify_uses_the_dequantized_experts(quantized):
    """`runtime verify`: the compiler's own dequantized checkpoint for transformers includes the expert stacks (a
    reference on the unquantized experts would be off by the rounding, far beyond 1e-4)."""
    if quantized[3] != "int8":
        pytest.skip("the int8 artifact carries the reference (the int4 one is built from a directory, without)")
    check_verify(quantized[0])
