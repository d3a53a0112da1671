"""A GGUF file compiled with its tensors' own types (--quant gguf) against HF
transformers loading the same file (transformers dequantizes it with gguf's reference, independently of trilite).

The file (tests/gguf_synth.py) is a tiny 2-layer Llama whose matrices cover every natively served type, mixed the way
a Q4_K_M file mixes them: layer 0's q / k / v are Q4_K, Q4_0 and Q6_K (merged into one qkv of int8_group per 16), its
o Q5_K, gate / up Q4_1, down Q4_K; layer 1's q / k / v are F16 and its gate Q2_K, which the kernels do not read: those
merges stay dequantized, and the compile output says so. fp32 on both sides: logits to 1e-4 relative error, greedy
tokens identical over 32 steps; logits on both the torch and interpret backends, greedy on torch (32 decode steps
through the interpreter take minutes; tests/kernels/test_gguf_matmul.py runs every decode layout there).
"""

from __future__ import annotations

import pytest

from runtime.artifact import describe, load_artifact
from tests.e2e.conftest import TINY_LIMITS, first_difference, greedy, hf_greedy, hf_logits, random_prompt, rel_err
from tests.e2e.quant_reference import GEN_TOKENS

BACKENDS = ("torch", "interpret")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from compiler.build import build
    from tests.gguf_synth import write_mixed_gguf

    root = tmp_path_factory.mktemp("gguf-native")
    path = write_mixed_gguf(root / "mixed.gguf")
    report = build(str(path), root / "art", targets=["cuda:80"], dtype="fp32", autotune=False, quant="gguf",
                   **TINY_LIMITS)
    model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=path.name, dtype="float32",
                                                 attn_implementation="eager").eval()
    return report, model


def test_each_tensor_keeps_its_layout(mixed):
    report, _ = mixed
    artifact = load_artifact(report.out, check_hashes=False)
    assert artifact.manifest["model"]["quant"] == "gguf"
    got = {n.name: (n.attr("quant"), n.attr("group_size")) for n in artifact.graph.nodes
           if n.op in ("linear", "rms_norm_linear", "embedding", "logits")}
    assert got == {
        "embed_tokens": ("int8_group", 32), "logits": ("int8_group", 16),  # Q8_0 table, Q6_K lm_head
        "layers.0.self_attn.qkv_proj": ("int8_group", 16),  # Q4_K + Q4_0 + Q6_K: the layout that holds all three
        "layers.0.self_attn.o_proj": ("int8_group", 32), "layers.0.mlp.gate_up_proj": ("int4", 32),  # Q5_K, Q4_1
        "layers.0.mlp.down_proj": ("int4", 32),  # Q4_K
        "layers.1.self_attn.qkv_proj": (None, None), "layers.1.mlp.gate_up_proj": (None, None),  # F16; Q2_K + Q8_0
        "layers.1.self_attn.o_proj": ("int8_group", 32), "layers.1.mlp.down_proj": ("int8_group", 16)}
    # the two merges with a non-native part are said in the compile output, naming the type
    assert len(report.notes) == 2 and any("F16" in n for n in report.notes) and any("Q2_K" in n for n in report.notes)
    w = describe(artifact)["weights"]
    assert w["gguf"]["Q4_1 -> int4/g32"] == 2 and w["gguf"]["F16 -> dequantized"] == 3
    assert w["decode_bytes"] < w["bytes"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers_on_the_file(mixed, backend):
    from runtime.engine import load

    report, model = mixed
    prompt = random_prompt(model.config.vocab_size, 11, seed=1)
    ref = hf_logits(model, prompt)
    out = load(report.out, backend=backend).logits(prompt)
    err = rel_err(out, ref)
    assert err <= 1e-4, f"{backend}: relative error {err:.2e}"
    assert (out.argmax(-1) == ref.argmax(-1).numpy()).all()


@pytest.mark.parametrize("backend", ["torch"])
def test_greedy_matches_transformers(mixed, backend):
    from runtime.engine import load

    report, model = mixed
    prompt = random_prompt(model.config.vocab_size, 5, seed=2)
    ref = hf_greedy(model, prompt, GEN_TOKENS)
    out = load(report.out, backend=backend).generate([prompt], greedy(GEN_TOKENS))[0].token_ids
    assert out == ref, f"{backend}: first difference at token {first_difference(out, ref)}"


def test_runtime_verify_passes(mixed):
    from runtime.verify import verify

    result = verify(mixed[0].out, backend="torch")
    assert result.passed and result.rel_err <= 1e-4, result.lines()
