"""Random presets compiled straight from their generator (RandomModelSpec.direct; the full-size MoE presets): the
tensors are the HF directory's, under transformers' parameter names, the same seed gives the same bytes, no HF
directory is written, and the reference logits still come from transformers (built from the config and those
tensors). Checked on tiny presets on the CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from compiler.frontends.presets import PRESETS, Preset
from compiler.frontends.random_direct import direct_tensors
from tests.e2e.conftest import TINY_LIMITS, hf_model


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_direct_tensors_are_what_transformers_loads_from_the_hf_directory(name):
    # transformers reads the hub layout the HF directory holds (per-expert matrices, Mixtral's block_sparse_moe) and
    # fuses it on its own: its state dict is an independent statement of names, stacking order and values.
    want = {k: v for k, v in hf_model(name).state_dict().items()}
    got = direct_tensors(PRESETS[name].random)
    assert set(got) == set(want) - ({"lm_head.weight"} if "lm_head.weight" not in got else set())
    for key in got:
        assert torch.equal(got[key], want[key]), key


def test_same_seed_same_weights():
    spec = PRESETS["tiny-qwen3-moe"].random
    a, b = direct_tensors(spec), direct_tensors(spec)
    other = direct_tensors(dataclasses.replace(spec, seed=spec.seed + 1))
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[stack], other[stack])


def test_direct_build_writes_no_hf_directory_and_keeps_the_reference(tmp_path, monkeypatch):
    from compiler.build import build
    from compiler.frontends.presets import cache_dir
    from runtime.verify import verify

    name = "tiny-mixtral-direct"
    spec = dataclasses.replace(PRESETS["tiny-mixtral"].random, direct=True)
    monkeypatch.setitem(PRESETS, name, Preset("tiny-mixtral, compiled straight from its generator", spec))
    direct = build(name, tmp_path / "direct", targets=["cuda:90"], dtype="fp32", autotune=False, **TINY_LIMITS).out
    assert not (cache_dir() / "presets" / name).exists()
    manifest = json.loads((direct / "manifest.json").read_text())
    assert manifest["model"]["source_sha256"] == spec.recipe("cpu")
    result = verify(direct, backend="torch")  # reference logits from transformers on the generator's tensors
    assert result.passed and result.rel_err <= 1e-4, result.lines()
    # The same weights as the preset compiled through its HF directory, tensor for tensor (the router is named as the
    # checkpoint names it: mlp.gate here, the hub's block_sparse_moe.gate there).
    from safetensors.torch import load_file

    via_dir = build("tiny-mixtral", tmp_path / "dir", targets=["cuda:90"], dtype="fp32", autotune=False,
                    reference=False, **TINY_LIMITS).out
    a, b = (load_file(str(p / "weights.safetensors")) for p in (direct, via_dir))
    b = {k.replace("block_sparse_moe.gate", "mlp.gate"): v for k, v in b.items()}
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_full_size_moe_presets_are_direct():
    assert PRESETS["qwen3-30b-a3b"].random.direct and PRESETS["mixtral-8x7b"].random.direct
    assert not PRESETS["tiny-mixtral"].random.direct
