import dataclasses
import itertools
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from compiler.frontends import load_source
from compiler.reference import load_reference_model, reference_logits
from tests.compiler.test_frontends import TINY, write_gguf

PROMPT = [1, 57, 74, 283, 301, 262, 268, 67, 82, 285, 294, 281, 223, 40, 2]


@pytest.mark.parametrize("name", TINY)
def test_reference_logits_shape_finite_deterministic_causal(name):
    src = load_source(name)
    logits = reference_logits(src, PROMPT)
    assert logits.shape == (len(PROMPT), src.config["vocab_size"]) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, reference_logits(src, PROMPT))
    # Causal: changing the last token leaves every earlier row as it was and changes the last one.
    other = reference_logits(src, PROMPT[:-1] + [7])
    torch.testing.assert_close(other[:-1], logits[:-1], atol=1e-5, rtol=1e-5)
    assert (other[-1] - logits[-1]).abs().max() > 1e-3
    # Not degenerate: logits spread over the vocabulary without one token taking all the mass (Gemma's soft-capped
    # and embedding-tied logits spread less: tiny-gemma2 caps them at +-1).
    assert (0.25 if name.startswith("tiny-gemma") else 0.5) < logits.std(dim=-1).mean() < 5
    assert logits.softmax(-1).max(dim=-1).values.mean() < 0.9


# A hub checkpoint's per-expert matrix, and where transformers keeps it: one slice of its fused expert tensors
# (gate_up_proj [E, 2I, D]: gate rows, then up rows; down_proj [E, D, I]), the router renamed from block_sparse_moe.
_EXPERT = re.compile(r"(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight")


def _loaded(state: dict, key: str) -> torch.Tensor:
    """The reference model's value for checkpoint tensor ``key``."""
    match = _EXPERT.fullmatch(key)
    if match is None:
        return state[key.replace(".block_sparse_moe.gate.", ".mlp.gate.")]
    layer, j, proj = match.group(1), int(match.group(2)), match.group(3)
    if proj in ("w2", "down_proj"):
        return state[f"{layer}.mlp.experts.down_proj"][j]
    gate_up = state[f"{layer}.mlp.experts.gate_up_proj"][j]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if proj in ("w1", "gate_proj") else gate_up[half:]


@pytest.mark.parametrize("name", TINY)
def test_reference_model_holds_the_source_weights(name):
    src = load_source(name)
    model = load_reference_model(src)
    state = model.state_dict()
    for key in src.tensors:
        assert torch.equal(_loaded(state, key), src.tensors[key]), key
    if src.config["tie_word_embeddings"]:
        assert torch.equal(state["lm_head.weight"], src.tensors["model.embed_tokens.weight"])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-hd80"])
def test_greedy_generation_does_not_lock_onto_one_token(name):
    model = load_reference_model(load_source(name))
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    new = out[0, len(PROMPT):].tolist()
    longest_run = max(len(list(run)) for _, run in itertools.groupby(new))
    assert len(set(new)) >= 8 and longest_run <= 8, new


def test_gguf_reference_matches_hf_reference(tmp_path, monkeypatch):
    # transformers un-permutes the GGUF's q/k rows by its own code: same logits as the HF directory.
    monkeypatch.setenv("TRILITE_CACHE", str(tmp_path / "cache"))
    src = load_source("tiny-mqa")
    gguf_src = load_source(str(write_gguf(src, tmp_path / "tiny-mqa.gguf")))
    torch.testing.assert_close(reference_logits(gguf_src, PROMPT), reference_logits(src, PROMPT),
                               atol=1e-5, rtol=1e-5)


def test_reference_refuses_a_model_with_weights_left_at_random_init(tmp_path):
    src = load_source("tiny-llama")
    d = tmp_path / "partial"
    shutil.copytree(src.hf_dir, d)
    save_file({k: v for k, v in src.tensors.items() if k != "model.norm.weight"}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"did not load every weight \(missing \['model.norm.weight'\]"):
        reference_logits(load_source(str(d)), PROMPT)


def test_reference_errors():
    src = load_source("tiny-llama")
    with pytest.raises(ValueError, match="at least one prompt token"):
        reference_logits(src, [])
    with pytest.raises(ValueError, match="no HF directory or GGUF file"):
        reference_logits(dataclasses.replace(src, hf_dir=None), PROMPT)
