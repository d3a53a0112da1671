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
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    attn_scale: float = 0.0  # softmax scale of the attention scores; 0: head_dim ** -0.5
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2); 0: off
    final_softcap: float = 0.0  # the same on the logits (Gemma 2, some Gemma 3); 0: off

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
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"config: hidden activation {self.hidden_act!r} is not silu or gelu_tanh")
        for key in ("attn_scale", "attn_softcap", "final_softcap"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"config: {key} must be >= 0 (0: off or default), not {getattr(self, key)!r}")

    @property
    def scale(self) -> float:
        """The attention softmax scale: query_pre_attn_scalar ** -0.5 where the config has one (Gemma)."""
        return self.attn_scale or self.head_dim ** -0.5

    @staticmethod
    def from_hf(config: Mapping, has_lm_head: bool) -> ModelConfig:
        family = family_of(config)
        gemma = family in ("gemma2", "gemma3")
        # Gemma configs name the activation hidden_activation (older ones hidden_act too); both mean GeGLU.
        key = "hidden_activation" if config.get("hidden_activation") else "hidden_act"
        act = config.get(key) or ("gelu_pytorch_tanh" if gemma else "silu")
        wanted = "gelu_pytorch_tanh" if gemma else "silu"
        if act != wanted:
            raise ValueError(f"config: {key} {act!r} is not supported for {family} (only {wanted})")
        heads = config["num_attention_heads"]
        # HF's Qwen3Config defaults head_dim to 128 (Gemma's to 256) where the others derive it from hidden_size.
        head_dim = config.get("head_dim") or {"qwen3": 128, "gemma2": 256, "gemma3": 256}.get(
            family, config["hidden_size"] // heads)
        extra = {}
        if gemma:
            # HF's defaults when the key is absent: Gemma 2 caps scores at 50 and logits at 30, Gemma 3 neither. Gemma
            # 3's attention ignores attn_logit_softcapping even when set (transformers never passes it on).
            attn_cap = config.get("attn_logit_softcapping", 50.0) if family == "gemma2" else None
            final_cap = config.get("final_logit_softcapping", 30.0 if family == "gemma2" else None)
            extra = {"hidden_act": "gelu_tanh", "attn_scale": float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
                     "attn_softcap": float(attn_cap or 0.0), "final_softcap": float(final_cap or 0.0)}
        return ModelConfig(
            family=family, architecture=(config.get("architectures") or [family])[0],
            hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"], num_q_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
            vocab_size=config["vocab_size"], eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", not has_lm_head)), **extra)


class Model:
    """What a model definition sees: config, step inputs, caches, cos_sin, windows, and weights by HF name.

    windows[i] is layer i's sliding window in tokens (0: full causal attention); one entry per layer, so a
    family that alternates local and global layers (Gemma) is a different list, not a different definition.
    local_cos_sin, where given, is the RoPE table of the sliding layers (Gemma 3's rope_local_base_freq), and
    sliding[i] says whether layer i is one: a window as long as max_seq_len is 0 in windows but still local here.
    """

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], tracer: Tracer, limits: Limits,
                 cos_sin: torch.Tensor, windows: tuple[int, ...] | None = None,
                 local_cos_sin: torch.Tensor | None = None, sliding: tuple[bool, ...] | None = None):
        self.cfg, self.limits, self.tracer, self._tensors = cfg, limits, tracer, tensors
        self.windows = tuple(windows) if windows is not None else (0,) * cfg.num_layers
        if len(self.windows) != cfg.num_layers or any(w < 0 for w in self.windows):
            raise ValueError(f"windows {self.windows}: one window >= 0 per layer ({cfg.num_layers}) is needed")
        self.sliding = tuple(sliding) if sliding is not None else tuple(w > 0 for w in self.windows)
        if len(self.sliding) != cfg.num_layers:
            raise ValueError(f"sliding {self.sliding}: one flag per layer ({cfg.num_layers}) is needed")
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
        self.local_cos_sin = None if local_cos_sin is None else tracer.weight("rope.local_cos_sin", local_cos_sin,
                                                                               "fp32")
        self.heads = {"num_q_heads": cfg.num_q_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}

    def weight(self, prefix: str) -> Sym:
        """The checkpoint tensor "{prefix}.weight"."""
        name = f"{prefix}.weight"
        if name not in self._tensors:
            raise ValueError(f"the checkpoint has no tensor {name}, which a {self.cfg.family} model needs: "
                             f"does config.json belong to these weights?")
        return self.tracer.weight(name, self._tensors[name])

    def rope_table(self, i: int) -> Sym:
        """Layer i's cos_sin: the local table on a sliding layer where the model has one, else the global one."""
        return self.local_cos_sin if self.local_cos_sin is not None and self.sliding[i] else self.cos_sin

    def offset_norm_weight(self, prefix: str) -> Sym:
        """1 + "{prefix}.weight" in fp32, as "{prefix}.offset.weight": Gemma's RMSNorm scales by (1 + w).

        Folded here, at compile time, so the norm kernels stay x * rstd * w'. It stays fp32 (the norm kernels
        compute in fp32 and take any weight dtype): HF computes 1 + w in fp32 and multiplies before it casts, and
        1 + w rounded to bf16 would lose most of w. Where a linear absorbs the norm, the fold rounds once, as ever.
        """
        name = f"{prefix}.weight"
        if name not in self._tensors:
            raise ValueError(f"the checkpoint has no tensor {name}, which a {self.cfg.family} model needs: "
                             f"does config.json belong to these weights?")
        return self.tracer.weight(f"{prefix}.offset.weight", 1.0 + self._tensors[name].float(), "fp32")

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
