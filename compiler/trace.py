"""Trace: run a family's model definition on symbolic tensors and get the unfused Graph plus its weights."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch

from artifact_format.graph import Graph, Limits
from compiler.models import Model, ModelConfig, family_of
from compiler.ops import Tracer

DTYPES = ("fp32", "fp16", "bf16")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def trace(config: dict, tensors: Mapping[str, torch.Tensor], dtype: str, limits: Limits
          ) -> tuple[Graph, dict[str, torch.Tensor]]:
    """config.json + HF-named tensors -> (graph over basic ops, the weights it references, checkpoint dtype).

    Every weight keeps its checkpoint name; ``rope.cos_sin`` [max_seq_len, rotary_dim] is added.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    family = family_of(config)
    cfg = ModelConfig.from_hf(config, has_lm_head="lm_head.weight" in tensors)
    tracer = Tracer(dtype)
    types = layer_types(config, cfg.num_layers)
    # Gemma 3 keeps one set of RoPE parameters per layer type: the global table for full layers, a local one.
    per_type = "sliding_attention" in (getattr(_hf_config(config), "rope_parameters", None) or {})
    local = rope_table(config, cfg.head_dim, limits.max_seq_len, "sliding_attention") if per_type else None
    m = Model(cfg, tensors, tracer, limits,
              rope_table(config, cfg.head_dim, limits.max_seq_len, "full_attention" if per_type else None),
              layer_windows(config, cfg.num_layers, limits.max_seq_len), local_cos_sin=local,
              sliding=tuple(t == "sliding_attention" for t in types))
    logits = importlib.import_module(f"compiler.models.{family}").forward(m)
    meta = {"family": family, "architecture": cfg.architecture, "num_layers": cfg.num_layers,
            "num_q_heads": cfg.num_q_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size, "block_size": limits.block_size, "max_blocks": limits.max_blocks,
            "max_seq_len": limits.max_seq_len, "rotary_dim": m.cos_sin.shape[1], "dtype": dtype, "eps": cfg.eps,
            "tie_word_embeddings": cfg.tie_word_embeddings}
    return tracer.graph({"logits": logits}, meta), dict(tracer.weights)


def _hf_config(config: Mapping):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = _su_as_longrope({k: v for k, v in config.items() if k != "model_type"})
    return CONFIG_MAPPING[config["model_type"]](**fields)


def layer_windows(config: Mapping, num_layers: int, max_seq_len: int) -> tuple[int, ...]:
    """Each layer's sliding window in tokens, 0 for full causal attention.

    Which layers slide is transformers' decision for the config: its ``layer_types`` where the config class has
    them (Qwen2/Qwen3 derive them from use_sliding_window and max_window_layers), else ``sliding_window`` on
    every layer (Mistral). A window no shorter than max_seq_len is plain causal attention, so it becomes 0 and
    the layer keeps the windowless kernels.
    """
    window = getattr(_hf_config(config), "sliding_window", None) or 0
    types = layer_types(config, num_layers)
    if "sliding_attention" in types and not (isinstance(window, int) and window > 0):
        raise ValueError(f"config: sliding_window must be a positive integer, not {window!r}")
    window = window if window < max_seq_len else 0
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def layer_types(config: Mapping, num_layers: int) -> list[str]:
    """"sliding_attention" or "full_attention" for each layer, as transformers decides them for the config.

    Its ``layer_types`` where the config class has them (Qwen2/Qwen3 derive them from use_sliding_window and
    max_window_layers, Gemma 2 alternates, Gemma 3 follows sliding_window_pattern), else ``sliding_window`` on
    every layer (Mistral).
    """
    hf = _hf_config(config)
    window = getattr(hf, "sliding_window", None) or 0
    types = list(getattr(hf, "layer_types", None) or
                 ["sliding_attention" if window else "full_attention"] * num_layers)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != num_layers:
        raise ValueError(f"config: layer_types {types} must name full_attention or sliding_attention for each of "
                         f"the {num_layers} layers")
    return types


def rope_table(config: Mapping, head_dim: int, max_seq_len: int, layer_type: str | None = None) -> torch.Tensor:
    """cos_sin [max_seq_len, rotary_dim] fp32: cos in the first rotary_dim/2 columns, sin in the rest.

    Frequencies and the attention scaling come from transformers' own RoPE code for the config, so the
    convention (neox halves, partial rotary, llama3 / linear / longrope scaling) is HF's to the bit.
    ``layer_type`` picks one set of a config that keeps RoPE parameters per layer type (Gemma 3: its local base
    frequency for sliding layers, rope_theta and any rope_scaling for full ones).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = _hf_config(config)
    hf.head_dim = head_dim
    params = dict(hf.rope_parameters if layer_type is None else hf.rope_parameters[layer_type])
    by_type = {} if layer_type is None else {"layer_type": layer_type}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported: supported are {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        # transformers keeps the default in each model class; this is its formula.
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = 1.0
    elif rope_type == "longrope":
        # HF picks short_factor or long_factor per forward by whether the step's last position passes
        # original_max_position_embeddings; one table must serve every step, so it takes the set for the longest
        # sequence this build admits: HF's exactly whenever max_seq_len <= the original length, which short
        # factors then cover. The attention factor (from max_position_embeddings / original) scales cos and sin.
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", seq_len=max_seq_len, **by_type)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", **by_type)
    freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=1).contiguous()


def _su_as_longrope(config: dict) -> dict:
    """Phi-3's first long-context configs name longrope "su" and keep original_max_position_embeddings at the top.

    transformers 5 renames "su" only after it has checked the longrope keys, so such a config fails there with a
    KeyError; this is the same config written the way it checks.
    """
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if "su" not in (rope.get("type"), rope.get("rope_type")):
        return config
    rope = {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": "longrope"}
    if "original_max_position_embeddings" in config:
        rope.setdefault("original_max_position_embeddings", config["original_max_position_embeddings"])
    return {**config, "rope_scaling": rope, "rope_parameters": None}
