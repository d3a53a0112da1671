"""Qwen2: the Llama decoder with a bias on the q, k and v projections."""

from __future__ import annotations

from compiler.models import Model, llama
from compiler.ops import Sym


def forward(m: Model) -> Sym:
    """ids [T] -> logits [R, V]; every layer must carry q/k/v biases."""
    for i in range(m.cfg.num_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            if m.bias(f"model.layers.{i}.self_attn.{proj}") is None:
                raise ValueError(f"the checkpoint has no tensor model.layers.{i}.self_attn.{proj}.bias, "
                                 f"which every Qwen2 attention layer has")
    return llama.forward(m)
