"""Compiled tiny models of every supported family against HF transformers, on the torch and interpret backends.

Each tiny preset is compiled (fp32, cross-compiled for cuda:80, cuda:90 and hip:gfx942) and run by
``runtime.load``: ``torch`` runs each op's reference, ``interpret`` runs the artifact's own kernel launches
through the Triton interpreter. Both must give HF's logits to 1e-4 relative error (fp32 on both sides, only the
summation order differs: the observed error is ~1e-6) and HF's greedy tokens, token for token, over 32 steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from artifact_format.layout import target_dir
from compiler.build import DEFAULT_TARGETS
from runtime.artifact import load_artifact
from runtime.engine import Engine, load
from tests.e2e.conftest import (
    TINY_PRESETS,
    first_difference,
    greedy,
    hf_greedy,
    hf_logits,
    hf_model,
    random_prompt,
    rel_err,
)

BACKENDS = ("torch", "interpret")
LOGITS_LEN = 11  # three prefill chunks of 4, 4 and 3 tokens
GEN_PROMPT_LEN, GEN_TOKENS = 5, 32
MAGIC = {"cuda": b"\x7fELF", "hip": b"\x7fELF"}  # cubin and hsaco are both ELF images


@dataclass
class Case:
    name: str
    path: Path
    config: dict
    logits_prompt: list[int]
    ref_logits: torch.Tensor  # [LOGITS_LEN, V] from HF
    gen_prompt: list[int]
    ref_tokens: list[int]  # HF greedy continuation of gen_prompt
    engines: dict[str, Engine] = field(default_factory=dict)

    def engine(self, backend: str) -> Engine:
        if backend not in self.engines:
            self.engines[backend] = load(self.path, backend=backend)
        return self.engines[backend]


@pytest.fixture(scope="module", params=TINY_PRESETS)
def case(request, tiny_artifact) -> Case:
    name = request.param
    path = tiny_artifact(name)
    model = hf_model(name)
    vocab = model.config.vocab_size
    seed = TINY_PRESETS.index(name)
    logits_prompt = random_prompt(vocab, LOGITS_LEN, seed=100 + seed)
    gen_prompt = random_prompt(vocab, GEN_PROMPT_LEN, seed=200 + seed)
    ref_tokens = hf_greedy(model, gen_prompt, GEN_TOKENS)
    # a continuation stuck on one token would make token-for-token agreement a weak check
    assert len(set(ref_tokens)) >= 8, (name, ref_tokens)
    config = json.loads((path / "manifest.json").read_text())["model"]["config"]
    return Case(name, path, config, logits_prompt, hf_logits(model, logits_prompt), gen_prompt, ref_tokens)


def test_presets_cover_every_supported_variant():
    """The features the tiny presets exist to cover; a preset edited away from its purpose fails here."""
    from compiler.frontends.presets import preset_dir

    configs = {n: json.loads((preset_dir(n) / "config.json").read_text()) for n in TINY_PRESETS}
    archs = {c["architectures"][0] for c in configs.values()}
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM",
            "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"} <= archs
    rope = [c.get("rope_scaling") or c.get("rope_parameters") or {} for c in configs.values()]
    assert any(r.get("rope_type") == "llama3" for r in rope)
    assert any(r.get("type") == "longrope" and set(r["short_factor"]) != {1.0} for r in rope)
    assert any(0 < c.get("partial_rotary_factor", 1.0) < 1 for c in configs.values())
    tied = {bool(c.get("tie_word_embeddings")) for c in configs.values()}
    assert tied == {True, False}
    kv = {(c["num_attention_heads"], c["num_key_value_heads"]) for c in configs.values()}
    assert any(k == 1 for _, k in kv) and any(1 < k < h for h, k in kv) and any(k == h for h, k in kv)
    head_dims = {c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"] for c in configs.values()}
    assert any(d & (d - 1) for d in head_dims), head_dims  # one that is not a power of two
    windows = [c.get("sliding_window") for c in configs.values() if c.get("sliding_window")]
    assert any(w < min(LOGITS_LEN, GEN_PROMPT_LEN) for w in windows), windows  # a window the prompts outgrow
    # Gemma: both soft-caps on (Gemma 2), sliding and full layers in one model, local and global rope tables with
    # scaling on the global one (Gemma 3)
    gemma2, gemma3 = configs["tiny-gemma2"], configs["tiny-gemma3"]
    assert gemma2["attn_logit_softcapping"] and gemma2["final_logit_softcapping"]
    assert gemma2["query_pre_attn_scalar"] != gemma2["head_dim"]
    assert gemma3["sliding_window_pattern"] <= gemma3["num_hidden_layers"] and gemma3["rope_scaling"]
    assert gemma3["rope_local_base_freq"] != gemma3["rope_theta"]
    # MoE: top-k renormalised (Mixtral) and not (Qwen3-MoE, with a dense layer among the sparse ones), a shared
    # expert (Qwen2-MoE)
    qwen3_moe = configs["tiny-qwen3-moe"]
    assert not qwen3_moe["norm_topk_prob"] and 1 < qwen3_moe["num_experts_per_tok"] < qwen3_moe["num_experts"]
    assert 0 < len(qwen3_moe["mlp_only_layers"]) < qwen3_moe["num_hidden_layers"]
    assert configs["tiny-qwen2-moe"]["shared_expert_intermediate_size"] > 0
    # q/k/v bias (Qwen2), q/k norm (Qwen3) and fused qkv/gate_up (Phi-3) are checked on the artifacts' weights below


def test_transformers_applies_the_sliding_window():
    """The windowed preset's reference is windowed: without its window HF gives other logits past the window."""
    from transformers import AutoModelForCausalLM

    from compiler.frontends.presets import preset_dir

    name = "tiny-mistral-swa"
    window = json.loads((preset_dir(name) / "config.json").read_text())["sliding_window"]
    ids = random_prompt(416, LOGITS_LEN, seed=1)
    windowed = hf_logits(hf_model(name), ids)
    full = hf_logits(AutoModelForCausalLM.from_pretrained(str(preset_dir(name)), dtype=torch.float32,
                                                          use_safetensors=True, sliding_window=None).eval(), ids)
    torch.testing.assert_close(windowed[:window], full[:window], rtol=1e-5, atol=1e-5)
    assert rel_err(windowed[window:], full[window:]) > 0.1


@pytest.mark.parametrize("name", [n for n in TINY_PRESETS if "mixtral" in n or "moe" in n])
def test_tokens_of_one_prompt_take_different_experts(name):
    """HF's own routers send the test prompt's tokens to different experts in every sparse layer, so one kernel
    reading a single expert for the whole step (or ignoring the routing) cannot match HF's logits."""
    model = hf_model(name)
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, args, out: chosen.append(out[2]))
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    ids = random_prompt(model.config.vocab_size, LOGITS_LEN, seed=100 + TINY_PRESETS.index(name))
    hf_logits(model, ids)
    for hook in hooks:
        hook.remove()
    assert chosen, f"{name}: no sparse layer ran"
    for layer_ids in chosen:  # [tokens, top_k]: the first choices alone differ, and most experts get a token
        assert len(set(layer_ids[:, 0].tolist())) >= 3 and len(set(layer_ids.flatten().tolist())) > \
            model.config.num_experts_per_tok, layer_ids.tolist()


def test_artifact_has_binaries_for_every_default_target(case):
    artifact = load_artifact(case.path)  # sha256 of every file checked here
    assert artifact.targets == list(DEFAULT_TARGETS) and artifact.dtype == "fp32"
    assert artifact.manifest["model"]["architecture"] == case.config["architectures"][0]
    for target in DEFAULT_TARGETS:
        index = artifact.kernel_index(target)
        launches = [launch for node in index.nodes for v in node.variants for launch in v.launches]
        assert launches and {launch.binary for launch in launches} <= set(index.binaries)
        for binary in index.binaries.values():
            data = (case.path / target_dir(target) / binary.file).read_bytes()
            assert data[:4] == MAGIC[target.split(":")[0]], (target, binary.file)
    weights = artifact.weights()
    if case.name == "tiny-qwen2":
        assert any(name.endswith("bias") for name in weights), sorted(weights)
    if case.name == "tiny-qwen3":
        assert any("q_norm" in name for name in weights) and any("k_norm" in name for name in weights)
    if case.name in ("tiny-gemma2", "tiny-gemma3"):  # GeGLU in the gate_up epilogue, both rope tables for Gemma 3
        assert "model.layers.0.mlp.gate_up_proj.folded.geglu.weight" in weights
        assert ("rope.local_cos_sin" in weights) == (case.name == "tiny-gemma3")
    if case.name in ("tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2-moe"):  # per-expert matrices stacked
        assert weights["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
        moe = [node for node in artifact.graph.nodes if node.op == "moe"]
        assert len(moe) == (2 if case.name == "tiny-mixtral" else 1)
        assert moe[0].attr("has_shared") == (True if case.name == "tiny-qwen2-moe" else None)
    if case.name == "tiny-phi3":  # the checkpoint's fused matrices, folded (and paired, interleaved) but never split
        assert "model.layers.0.self_attn.qkv_proj.folded.rope.weight" in weights
        assert "model.layers.0.mlp.gate_up_proj.folded.swiglu.weight" in weights
        assert artifact.manifest["model"]["config"]["partial_rotary_factor"] == 0.75


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(case, backend):
    engine = case.engine(backend)
    out = engine.logits(case.logits_prompt)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == case.ref_logits.shape
    err = rel_err(out, case.ref_logits)
    assert err <= 1e-4, f"{case.name} on {backend}: relative error {err:.2e}"
    assert np.array_equal(out.argmax(-1), case.ref_logits.argmax(-1).numpy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches_transformers(case, backend):
    engine = case.engine(backend)
    out = engine.generate([case.gen_prompt], greedy(GEN_TOKENS))[0]
    assert out.prompt_token_ids == case.gen_prompt and out.finish_reason == "length"
    assert out.token_ids == case.ref_tokens, f"{case.name} on {backend}: first difference at token " \
        f"{first_difference(out.token_ids, case.ref_tokens)}"
    assert engine.scheduler.idle and engine.allocator.num_free == engine.backend.num_blocks
