"""The transformers side of the quantized e2e tests (test_quant.py, test_quant_int4.py), built from the schemes'
definitions, not from the artifact or the compiler, and the checks both files run against it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from runtime.engine import load
from tests.e2e.conftest import first_difference, greedy, hf_greedy, hf_logits, hf_model, random_prompt, rel_err

GEN_TOKENS = 32


@torch.no_grad()
def quantize_like_the_artifact(model, round_trip: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Each linear's weight, the embedding table and the lm_head through ``round_trip`` as the artifact holds them: W
    itself, rounded, since a quantized build leaves the norm weight in front out of W (the kernel applies it to x, as
    transformers' own norm does here); the tables as [V, D] matrices, rows along D, a tied table once.
    Phi-3's fused qkv_proj / gate_up_proj are one matrix each; MoE experts are rounded expert by expert (each
    expert's [2I, D] gate_up and [D, I] down matrix as a linear's weight), MoE routers and a shared expert's gate stay
    as they are (the moe node's, unquantized), a shared expert's linears are rounded. Row permutations (rope
    pairing, gate/up interleave) and merges move whole rows, which change neither a per-row nor a per-group-along-K
    rounding."""
    tables = {id(t): t for t in (model.model.embed_tokens.weight, model.lm_head.weight)}  # one entry when tied
    for table in tables.values():
        table.copy_(round_trip(table.float()))
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.qkv_proj,) if hasattr(attn, "qkv_proj") else (attn.q_proj, attn.k_proj, attn.v_proj)
        linears = [*qkv, attn.o_proj]
        if hasattr(mlp, "experts"):
            for stack in (mlp.experts.gate_up_proj, mlp.experts.down_proj):  # [E, N, K]
                stack.copy_(torch.stack([round_trip(m.float()) for m in stack]))
            shared = getattr(mlp, "shared_expert", None)
            if shared is not None:
                linears += [shared.gate_proj, shared.up_proj, shared.down_proj]
        else:
            gate_up = (mlp.gate_up_proj,) if hasattr(mlp, "gate_up_proj") else (mlp.gate_proj, mlp.up_proj)
            linears += [*gate_up, mlp.down_proj]
        for lin in linears:
            lin.weight.copy_(round_trip(lin.weight.float()))


def check_norm_in_kernel(artifact) -> None:
    """Every rms_norm_linear applies its norm weight to x (attr use_norm_w, input norm_w: the source's norm weight,
    1 + w for Gemma, [K]); no weight of the artifact has a norm folded in, and the manifest says so."""
    fused = [n for n in artifact.graph.nodes if n.op == "rms_norm_linear"]
    assert len(fused) == 4  # qkv and gate_up of each of the two layers
    for n in fused:
        assert n.attr("use_norm_w") is True and "layernorm" in n.input("norm_w")
        assert artifact.graph.tensor(n.input("norm_w")).shape == artifact.graph.tensor(n.input("x")).shape[1:]
    assert not [r for r in artifact.manifest["model"]["transforms"] if r["op"] == "fold_rms_norm"]
    assert artifact.manifest["model"]["norm_weights"].startswith("applied to x in rms_norm_linear")


def check_logits(path: Path, model, name: str, backend: str, seed: int) -> None:
    """The artifact's logits within 1e-4 of transformers on the rounded weights, same argmax, and measurably further
    from the unquantized model (the quantization is real)."""
    prompt = random_prompt(model.config.vocab_size, 11, seed=seed)
    ref = hf_logits(model, prompt)
    out = load(path, backend=backend).logits(prompt)
    err = rel_err(out, ref)
    assert err <= 1e-4, f"{backend}: relative error {err:.2e}"
    assert np.array_equal(out.argmax(-1), ref.argmax(-1).numpy())  # Engine.logits: numpy fp32
    assert rel_err(out, hf_logits(hf_model(name), prompt)) > 10 * max(err, 1e-7)


def check_greedy(path: Path, model, backend: str, seed: int) -> None:
    """GEN_TOKENS greedy tokens identical to transformers' on the rounded weights."""
    prompt = random_prompt(model.config.vocab_size, 5, seed=seed)
    ref = hf_greedy(model, prompt, GEN_TOKENS)
    assert len(set(ref)) >= 8, ref
    out = load(path, backend=backend).generate([prompt], greedy(GEN_TOKENS))[0]
    assert out.token_ids == ref, f"{backend}: first difference at token {first_difference(out.token_ids, ref)}"


def check_verify(path: Path) -> None:
    from runtime.verify import verify

    result = verify(path, backend="torch")
    assert result.passed and result.rel_err <= 1e-4, result.lines()
