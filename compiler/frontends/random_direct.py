"""A random preset as a ModelSource straight from its generator: no HF directory on disk, the weights drawn as the
compiler reads them and written once, into the artifact (RandomModelSpec.direct; the full-size MoE presets, whose
HF directory and artifact would not both fit a GPU machine's disk: Qwen3-30B-A3B is 61 GB in bf16, Mixtral 93 GB).

Every tensor is the one random_model.write_random_model would write: drawn by make_tensor from (seed, hub name), on
the GPU's generator where the spec says so, one tensor at a time. The names are the HF model's own parameter names,
so the same mapping is the compiler's input and transformers' state dict for reference logits: each layer's experts
as the fused stacks ``mlp.experts.gate_up_proj`` [E, 2I, D] (each expert's gate rows, then its up rows) and
``mlp.experts.down_proj`` [E, D, I], filled expert by expert from the per-expert tensors (what Model.experts stacks
from an HF directory, so both paths give the same artifact weights), and Mixtral's router under ``mlp.gate``.
"""

from __future__ import annotations

import functools
import re

import torch

from compiler.frontends import LazyTensors, ModelSource
from compiler.frontends.random_model import (
    RandomModelSpec,
    build_tokenizer,
    make_tensor,
    parameter_shapes,
    tokenizer_config,
)

# A hub checkpoint's per-expert matrix: (layer prefix, experts prefix, expert index, projection).
_EXPERT = re.compile(r"^(model\.layers\.\d+\.)(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
# Which stack and which half of it each projection fills.
_PROJ = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
         "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", 0), "down_proj": ("down_proj", 0)}


def _stack(spec: RandomModelSpec, generator: str, parts: list[list[tuple[str, tuple[int, ...], str]]]
           ) -> torch.Tensor:
    """[E, rows, K]: expert j's tensors of parts[j], one under the other, each drawn on its own."""
    first = parts[0][0][1]
    out = torch.empty(len(parts), first[0] * len(parts[0]), first[1], dtype=getattr(torch, spec.dtype))
    for j, entries in enumerate(parts):
        row = 0
        for name, shape, kind in entries:
            out[j, row:row + shape[0]] = make_tensor(spec, name, shape, kind, generator)
            row += shape[0]
    return out


def direct_tensors(spec: RandomModelSpec, generator: str = "cpu") -> LazyTensors:
    """HF parameter name -> a loader drawing that tensor (an expert stack expert by expert)."""
    loaders = {}
    stacks: dict[str, dict[int, list]] = {}
    for name, shape, kind in parameter_shapes(spec.config):
        m = _EXPERT.match(name)
        if m is None:
            loaders[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = functools.partial(
                make_tensor, spec, name, shape, kind, generator)
            continue
        stack, half = _PROJ[m.group(3)]
        experts = stacks.setdefault(f"{m.group(1)}mlp.experts.{stack}", {})
        experts.setdefault(int(m.group(2)), [None, None])[half] = (name, shape, kind)
    for stack, experts in stacks.items():
        parts = [[e for e in experts[j] if e is not None] for j in sorted(experts)]
        loaders[stack] = functools.partial(_stack, spec, generator, parts)
    return LazyTensors(loaders)


def load_direct(spec: RandomModelSpec, name: str) -> ModelSource:
    """The preset ``name`` as a ModelSource without files: its sha256 is the generator recipe's (what decides the
    bytes), as an HF directory's stamp records it."""
    generator = spec.generator()
    return ModelSource(name=name, config=dict(spec.config), tensors=direct_tensors(spec, generator),
                       tokenizer_json=build_tokenizer().encode(),
                       tokenizer_config=tokenizer_config(spec.config.get("max_position_embeddings", 2048)),
                       hf_dir=None, gguf_path=None, sha256=spec.recipe(generator),
                       hf_names=True)
