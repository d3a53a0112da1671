"""Lowering: fused graph nodes -> kernel plans (meta, dtypes, config per variant) -> index.json entries.

A graph node becomes one or more *variants*: the graph op `attention` has a decode variant
(attention_decode) and a prefill variant (attention_prefill); ops whose best tile depends on the
token count (KernelSpec.tune_buckets) get one variant per token bucket. Each variant is a kernel
Plan for one Config; the config comes from the autotuner, the tuning database or the spec's default.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from artifact_format.graph import Graph, Limits, Node
from kernels.spec import Config, KernelSpec, Plan


def spec_of(op: str) -> KernelSpec:
    return importlib.import_module(f"kernels.{op}").SPEC


def _shape(graph: Graph, node: Node, role: str) -> tuple:
    return graph.tensor(node.input(role) or node.output(role)).shape


# Static sizes each op's plan reads (docs/ops.md, "meta keys"), taken from the node's tensor shapes.
_SIZES: dict[str, Callable[[Graph, Node], dict]] = {
    # V from the table, D from the activation: an int4 table is packed two values per byte, [V, D / 2].
    "embedding": lambda g, n: {"V": _shape(g, n, "weight")[0], "D": _shape(g, n, "out")[1]},
    "rms_norm": lambda g, n: {"D": _shape(g, n, "w")[0]},
    "add_rms_norm": lambda g, n: {"D": _shape(g, n, "w")[0]},
    "rms_norm_gated": lambda g, n: {"D": _shape(g, n, "w")[0]},
    # K from x: an int4 w is packed two values per byte, [N, K / 2].
    "rms_norm_linear": lambda g, n: {"N": _shape(g, n, "w")[0], "K": _shape(g, n, "x")[1]},
    "linear": lambda g, n: {"N": _shape(g, n, "w")[0], "K": _shape(g, n, "x")[1]},
    "rope": lambda g, n: {"max_pos": _shape(g, n, "cos_sin")[0]},
    "kv_cache_write": lambda g, n: {},
    "attention_prefill": lambda g, n: {"max_blocks": _shape(g, n, "block_tables")[1]},
    "attention_decode": lambda g, n: {"max_blocks": _shape(g, n, "block_tables")[1]},
    "silu_mul": lambda g, n: {"I": _shape(g, n, "out")[1]},
    "gelu_tanh_mul": lambda g, n: {"I": _shape(g, n, "out")[1]},
    "logits": lambda g, n: {"V": _shape(g, n, "weight")[0], "D": _shape(g, n, "x")[1]},
    # w13 [E, 2I, D]; D from x: an int4 w13 is packed two values per byte, [E, 2I, D / 2].
    "moe": lambda g, n: {"E": _shape(g, n, "w13")[0], "I": _shape(g, n, "w13")[1] // 2, "D": _shape(g, n, "x")[1]},
}


@dataclass(frozen=True)
class VariantSpec:
    """One variant of a node before a config is chosen."""

    node: str
    op: str  # kernel op (attention -> attention_decode / attention_prefill)
    step: str  # "any" | "prefill" | "decode"
    max_T: int | None  # None: up to limits.max_num_tokens
    meta: tuple
    dtypes: tuple

    @property
    def spec(self) -> KernelSpec:
        return spec_of(self.op)

    def meta_dict(self) -> dict:
        return dict(self.meta)

    def dtypes_dict(self) -> dict:
        return dict(self.dtypes)

    def plan(self, config: Config) -> Plan:
        return self.spec.plan(self.meta_dict(), self.dtypes_dict(), config)

    def tuning_key(self) -> str:
        """What a tuning decision depends on: op, sizes and attrs, dtypes, token bucket."""
        meta = {k: v for k, v in self.meta if k not in ("max_T", "max_S")}
        return f"{self.op}|{sorted(meta.items())}|{sorted(self.dtypes)}"


def node_variants(graph: Graph, node: Node, limits: Limits) -> list[VariantSpec]:
    ops = [("attention_decode", "decode"), ("attention_prefill", "prefill")] if node.op == "attention" \
        else [(node.op, "any")]
    dtypes = {role: graph.tensor(name).dtype for role, name in (*node.inputs, *node.outputs)}
    out = []
    for op, step in ops:
        base = {**dict(node.attrs), **_SIZES[op](graph, node), "max_T": limits.max_num_tokens,
                "max_S": limits.max_batch}
        if step == "decode":
            base["max_T"] = limits.max_batch  # a decode step carries one token per sequence
        # tune_buckets are upper bounds on T: one variant per bucket, the last one covering the rest.
        for hi in [*(b for b in spec_of(op).tune_buckets if b < base["max_T"]), None]:
            meta = {**base, "T_bucket": hi if hi is not None else base["max_T"]}
            out.append(VariantSpec(node.name, op, step, hi, tuple(sorted(meta.items())), tuple(sorted(dtypes.items()))))
    return out


def sampling_variant(vocab_size: int, limits: Limits) -> VariantSpec:
    dtypes = {"logits": "fp32", "temperature": "fp32", "top_k": "i32", "top_p": "fp32", "min_p": "fp32",
              "seeds": "i64", "offsets": "i64", "out": "i32"}
    meta = {"V": vocab_size, "max_T": limits.max_num_tokens, "max_S": limits.max_batch, "T_bucket": limits.max_batch}
    return VariantSpec("sampling", "sampling", "any", None, tuple(sorted(meta.items())), tuple(sorted(dtypes.items())))
