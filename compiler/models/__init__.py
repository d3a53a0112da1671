"""Model definitions, one module per architecture family, and what every definition is handed.

A family module exposes ``forward(m: Model) -> Sym`` (the logits, traced). ``Model`` carries the validated
config, the step inputs and KV caches as symbolic tensors, the RoPE table, each layer's sliding window, and weight
look-up by HF name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from artifact_format.graph import STEP_INPUTS, Limits
from compiler.frontends import family_of
from compiler.ops import Sym, Tracer

_INPUT_SHAPES = {"ids": ("T",), "positions": ("T",), "slot_mapping": ("T",), "cu_seqlens_q": ("S+1",),
                 "seq_lens": ("S",), "block_tables": ("S", "max_blocks"), "last_idx": ("R",)}


@dataclass(frozen=True)
class ModelConfig:
    """The facts of an HF config.json a model definition uses, checked."""

    family: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eps: float
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_q_heads", "num_kv_heads", "head_dim",
                    "vocab_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"config: {key} must be a positive integer, not {getattr(self, key)!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"config: num_attention_heads {self.num_q_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")
        if not self.eps > 0:
            raise ValueError(f"config: rms_norm_eps must be positive, not {self.eps}")

    @staticmethod
    def from_hf(config: Mapping, has_lm_head: bool) -> ModelConfig:
        family = family_of(config)
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config: hidden_act {act!r} is not supported for {family} (only silu)")
        heads = config["num_attention_heads"]
        # HF's Qwen3Config defaults head_dim to 128 where the others derive it from hidden_size.
        head_dim = config.get("head_dim") or (128 if family == "qwen3" else config["hidden_size"] // heads)
        return ModelConfig(
            family=family, architecture=(config.get("architectures") or [family])[0],
            hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"], num_q_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
            vocab_size=config["vocab_size"], eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", not has_lm_head)))


class Model:
    """What a model definition sees: config, step inputs, caches, cos_sin, windows, and weights by HF name.

    windows[i] is layer i's sliding window in tokens (0: full causal attention); one entry per layer, so a
    family that alternates local and global layers (Gemma) is a different list, not a different definition.
    """

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], tracer: Tracer, limits: Limits,
                 cos_sin: torch.Tensor, windows: tuple[int, ...] | None = None):
        self.cfg, self.limits, self.tracer, self._tensors = cfg, limits, tracer, tensors
        self.windows = tuple(windows) if windows is not None else (0,) * cfg.num_layers
        if len(self.windows) != cfg.num_layers or any(w < 0 for w in self.windows):
            raise ValueError(f"windows {self.windows}: one window >= 0 per layer ({cfg.num_layers}) is needed")
        inputs = {name: tracer.source(name, "i32", tuple(limits.max_blocks if d == "max_blocks" else d
                                                         for d in _INPUT_SHAPES[name]), "input")
                  for name in STEP_INPUTS}
        self.ids, self.positions, self.slot_mapping = inputs["ids"], inputs["positions"], inputs["slot_mapping"]
        self.cu_seqlens_q, self.seq_lens, self.block_tables = (inputs["cu_seqlens_q"], inputs["seq_lens"],
                                                               inputs["block_tables"])
        self.last_idx = inputs["last_idx"]
        cache_shape = ("NB", limits.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache, self.v_cache = [], []
        for i in range(cfg.num_layers):
            self.k_cache.append(tracer.source(f"k_cache.{i}", tracer.dtype, cache_shape, "cache"))
            self.v_cache.append(tracer.source(f"v_cache.{i}", tracer.dtype, cache_shape, "cache"))
        self.cos_sin = tracer.weight("rope.cos_sin", cos_sin, "fp32")
        self.heads = {"num_q_heads": cfg.num_q_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}

    def weight(self, prefix: str) -> Sym:
        """The checkpoint tensor "{prefix}.weight"."""
        name = f"{prefix}.weight"
        if name not in self._tensors:
            raise ValueError(f"the checkpoint has no tensor {name}, which a {self.cfg.family} model needs: "
                             f"does config.json belong to these weights?")
        return self.tracer.weight(name, self._tensors[name])

    def bias(self, prefix: str) -> Sym | None:
        """The checkpoint tensor "{prefix}.bias", or None where the checkpoint has none."""
        name = f"{prefix}.bias"
        return self.tracer.weight(name, self._tensors[name]) if name in self._tensors else None

    def lm_head(self) -> Sym:
        """lm_head.weight, or the embedding itself when tied (one tensor, shared)."""
        return self.weight("model.embed_tokens" if self.cfg.tie_word_embeddings else "lm_head")

    @contextlib.contextmanager
    def scope(self, prefix: str) -> Iterator[None]:
        with self.tracer.scope(prefix):
            yield
