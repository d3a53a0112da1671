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


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
# HF's defaults of the Qwen MoE configs: (num_experts, num_experts_per_tok, moe_intermediate_size).
_QWEN_MOE_DEFAULTS = {"qwen2_moe": (60, 4, 1408), "qwen3_moe": (128, 8, 768)}


@dataclass(frozen=True)
class MoeConfig:
    """The experts of a mixture-of-experts config.json: how many, how many per token, their MLP width, whether the
    top-k routing weights are renormalised to sum to 1, and which layers are sparse (the others: a dense MLP)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    sparse: tuple[bool, ...]
    shared_intermediate_size: int = 0  # the shared expert's MLP width (Qwen2-MoE); 0: none

    def __post_init__(self) -> None:
        for key in ("num_experts", "top_k", "intermediate_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"config: MoE {key} must be a positive integer, not {getattr(self, key)!r}")
        if not isinstance(self.shared_intermediate_size, int) or self.shared_intermediate_size < 0:
            raise ValueError(f"config: shared_expert_intermediate_size must be a positive integer, not "
                             f"{self.shared_intermediate_size!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"config: num_experts_per_tok {self.top_k} is more than the {self.num_experts} experts: "
                             f"fix config.json")

    @staticmethod
    def from_hf(config: Mapping, family: str) -> MoeConfig:
        layers = config["num_hidden_layers"]
        if family == "mixtral":  # every layer sparse; the top-k weights always renormalised (MixtralTopKRouter)
            return MoeConfig(config.get("num_local_experts", 8), config.get("num_experts_per_tok", 2),
                             config["intermediate_size"], True, (True,) * layers)
        # Qwen2/3-MoE: layer i is sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid
        # (Qwen3MoeDecoderLayer); renormalised where norm_topk_prob says (HF's default: False). Qwen2-MoE adds a
        # shared expert to every sparse layer.
        step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or ())
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"config: decoder_sparse_step must be a positive integer, not {step!r}")
        experts, top_k, inter = _QWEN_MOE_DEFAULTS[family]
        experts = config.get("num_experts", experts)
        sparse = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers))
        shared = config.get("shared_expert_intermediate_size", 5632) if family == "qwen2_moe" else 0
        return MoeConfig(experts, config.get("num_experts_per_tok", top_k), config.get("moe_intermediate_size", inter),
                         bool(config.get("norm_topk_prob", False)), sparse, shared)


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
    moe: MoeConfig | None = None  # the experts of a mixture-of-experts family (Mixtral, Qwen3-MoE)

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
        if self.moe is not None and len(self.moe.sparse) != self.num_layers:
            raise ValueError(f"config: {len(self.moe.sparse)} MoE layer flags for {self.num_layers} layers")

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
        if family in MOE_FAMILIES:
            extra["moe"] = MoeConfig.from_hf(config, family)
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

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds a tensor of that name (a family whose checkpoints come in two layouts)."""
        return name in self._tensors

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

    def experts(self, p: str, legacy: str, gate: str, up: str, down: str) -> tuple[Sym, Sym]:
        """Layer p's experts as (w13 [E, 2I, D]: each expert's gate rows, then its up rows; w2 [E, D, I]), named
        "{p}mlp.experts.gate_up_proj" / "down_proj" as HF's fused layout is: taken as they are where the checkpoint
        has that layout, else stacked from per-expert matrices "{p}{legacy}.{j}.{gate|up|down}.weight" (the hub's).
        """
        fused = (f"{p}mlp.experts.gate_up_proj", f"{p}mlp.experts.down_proj")
        if all(name in self._tensors for name in fused):
            return tuple(self.tracer.weight(name, self._tensors[name]) for name in fused)
        names = [[f"{p}{legacy}.{j}.{proj}.weight" for j in range(self.cfg.moe.num_experts)]
                 for proj in (gate, up, down)]
        missing = [name for group in names for name in group if name not in self._tensors]
        if missing:
            raise ValueError(f"the checkpoint has neither {fused[0]} nor {missing[0]}, which a {self.cfg.family} "
                             f"model with {self.cfg.moe.num_experts} experts needs: does config.json belong to these "
                             f"weights?")
        return self.tracer.weight(fused[0], self._stack(names[0], names[1])), self.tracer.weight(fused[1],
                                                                                                 self._stack(names[2]))

    def _stack(self, *groups: list[str]) -> torch.Tensor:
        """[E, sum of the groups' rows, K]: expert j's matrices of each group, one under the other; filled expert by
        expert, so a checkpoint read lazily holds one matrix in memory beside the result."""
        out = None
        for j, parts in enumerate(zip(*groups)):
            row = 0
            for name in parts:
                t = self._tensors[name]
                if out is None:
                    out = torch.empty(len(groups[0]), t.shape[0] * len(groups), t.shape[1], dtype=t.dtype)
                out[j, row:row + t.shape[0]] = t
                row += t.shape[0]
        return out

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
