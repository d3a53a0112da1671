"""Graph passes: the traced graph of basic ops -> a graph of kernel ops (docs/ops.md), weights transformed.

Order matters, and each step says why it comes where it does:
  fuse_silu_mul       first, so the gate/up concat it makes is there for merge_linears
  fuse_qk_norm_rope   Qwen3's per-head norms go into rope before anything else reads around them
  fuse_rope_cache_write  kv_cache_write joins the rope before it (after the q/k norm did, which rebuilds rope)
  merge_linears       q/k/v -> qkv, gate/up -> gate_up (weights concatenated)
  fuse_residual       residual adds become the epilogue of the linear before them
  fuse_norm_residual  adds after a norm (Gemma's post-norms) become that norm's epilogue, before add_rms_norm
                      could pair them with the norm after them, which must stay free to fold into its linear
  fuse_logits         final norm + gather + lm_head -> logits, before add_rms_norm could take the norm
  fuse_add_rms_norm   adds left over (no linear to take them) fuse with the norm after them
  fold_norms          norms read only by linears fold into them (rms_norm_linear, W' = W diag(g)); with --quant the
                      norm weight stays out of W (input norm_w, applied to x in the kernel), so W keeps its grid
  fuse_swiglu         rms_norm_linear(gate_up) + silu_mul (or gelu_tanh_mul) -> one rms_norm_linear with that act
                      (gate/up rows interleaved); after fold_norms, which makes the rms_norm_linear it needs
  fuse_rope_epilogue  rms_norm_linear / linear(qkv) + rope -> one matmul with act "rope" (q/k rows paired); after
                      fuse_rope_cache_write, so the cache write comes along, and after fold_norms and fuse_residual,
                      which settle which matmul (with a norm or without, no residual) makes the qkv
  eliminate_dead      unused nodes and weights go
  quantize_weights    only with --quant int8 (every linear / rms_norm_linear weight -> int8 + an fp32 scale per output
                      channel) or --quant int4 (packed nibbles + fp32 scale and min per group along K); after every
                      pass that merges or reorders weight rows, so the rows quantized are the rows the kernel
                      reads
  repack_gguf         instead, with --quant gguf (a GGUF source): the same weights keep their GGUF blocks, repacked
                      (int4 or int8_group per group along K), the row operations of the passes before replayed on
                      them (compiler/passes/gguf_weights.py)
  cast_weights        fp32 values -> the build dtype (cos_sin and quantization scales stay fp32)

Per Llama decoder layer the result is rms_norm_linear(qkv with the rope and KV-cache write epilogue), attention,
linear(o, +residual), rms_norm_linear(gate_up with the SwiGLU epilogue), linear(down, +residual): five launches.
Qwen3 keeps its rope (with the q/k norm and the cache write) between the qkv matmul and attention: six.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch

from artifact_format.graph import GRAPH_OPS, Graph
from compiler.passes.fuse import (
    fuse_add_rms_norm,
    fuse_logits,
    fuse_norm_residual,
    fuse_qk_norm_rope,
    fuse_residual,
    fuse_rope_cache_write,
    fuse_silu_mul,
)
from compiler.passes.gguf_weights import repack_gguf
from compiler.passes.weights import (
    cast_weights,
    eliminate_dead,
    fold_norms,
    fuse_rope_epilogue,
    fuse_swiglu,
    merge_linears,
    quantize_weights,
)
from kernels.weight_quant import INT4_GROUP_SIZES

Pass = Callable[[Graph, Mapping[str, torch.Tensor]], tuple[Graph, dict[str, torch.Tensor], list[dict]]]


def structural(fn: Callable[[Graph], Graph]) -> Pass:
    """A Graph -> Graph pass in the weight-carrying signature."""
    return lambda g, w: (fn(g), dict(w), [])


PASSES: tuple[tuple[str, Pass], ...] = (
    ("fuse_silu_mul", structural(fuse_silu_mul)),
    ("fuse_qk_norm_rope", structural(fuse_qk_norm_rope)),
    ("fuse_rope_cache_write", structural(fuse_rope_cache_write)),
    ("merge_linears", merge_linears),
    ("fuse_residual", structural(fuse_residual)),
    ("fuse_norm_residual", structural(fuse_norm_residual)),
    ("fuse_logits", structural(fuse_logits)),
    ("fuse_add_rms_norm", structural(fuse_add_rms_norm)),
    ("fold_norms", fold_norms),
    ("fuse_swiglu", fuse_swiglu),
    ("fuse_rope_epilogue", fuse_rope_epilogue),
    ("eliminate_dead", eliminate_dead),
    ("cast_weights", cast_weights),
)
# Weight schemes (kernels/weight_quant.py) quantize_weights applies, run just before cast_weights; "gguf" keeps a
# GGUF source's own blocks (repack_gguf) in their place.
QUANT_CHOICES = ("none", "int8", "int4", "gguf")


def passes_for(quant: str = "none", group_size: int | None = None, stored: Mapping | None = None
               ) -> tuple[tuple[str, Pass], ...]:
    """PASSES, with the scheme's quantization pass before cast_weights unless ``quant`` is "none". ``group_size``
    (int4 only; default 128) is checked here, so a bad option is one line before any work. ``stored``: with "gguf",
    the source's GGUF tensors (ModelSource.stored)."""
    if quant not in QUANT_CHOICES:
        raise ValueError(f"--quant {quant} is not a weight scheme: use --quant {', '.join(QUANT_CHOICES)}")
    if group_size is not None and quant != "int4":
        raise ValueError(f"--group-size {group_size} only applies to --quant int4 (got --quant {quant}): drop it or "
                         f"add --quant int4")
    if group_size is not None and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"--group-size {group_size} is not supported: use one of "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    if quant == "none":
        return PASSES
    if quant == "gguf":
        step = ("repack_gguf", functools.partial(repack_gguf, stored=stored or {}))
    else:
        step = ("quantize_weights", functools.partial(quantize_weights, scheme=quant, group_size=group_size))
    # Every rms_norm_linear weight gets quantized, so none takes the norm weight: the kernels apply it to x.
    unfolded = tuple((name, functools.partial(fold_norms, in_kernel=True)) if name == "fold_norms" else (name, p)
                     for name, p in PASSES)
    return (*unfolded[:-1], step, unfolded[-1])


def optimize(graph: Graph, weights: Mapping[str, torch.Tensor], dtype: str, quant: str = "none",
             group_size: int | None = None, stored: Mapping | None = None
             ) -> tuple[Graph, dict[str, torch.Tensor], list[dict]]:
    """Traced graph + fp32 weights -> (graph of kernel ops, weights in ``dtype`` (cos_sin fp32), transform records).

    quant "int8": the matmul weights int8 with fp32 scales (quantize_weights); "int4": packed int4 with fp32 scales
    and mins per group of ``group_size`` (default 128) along K; "gguf": the GGUF blocks of ``stored``
    (ModelSource.stored) repacked where their type is native, the rest as "none"; "none": every weight in ``dtype``.

    The inputs are not modified. ValueError if an op is left that no kernel implements.
    """
    if graph.get_meta("dtype", dtype) != dtype:
        raise ValueError(f"the graph was traced for {graph.get_meta('dtype')}, not {dtype}: trace again")
    if quant == "gguf" and not stored:
        raise ValueError("--quant gguf keeps a GGUF file's own quantized tensors: the source is not a .gguf file (use "
                         "--quant none, int8 or int4)")
    g, w, records = graph, dict(weights), []
    for name, run in passes_for(quant, group_size, stored):
        # repack_gguf replays the row operations the passes before it recorded
        g, w, new = run(g, w, records=records) if name == "repack_gguf" else run(g, w)
        records += new
    left = sorted({n.op for n in g.nodes} - set(GRAPH_OPS))
    if left:
        names = [n.name for n in g.nodes if n.op in left]
        raise ValueError(f"no kernel implements op(s) {', '.join(left)} left after fusion (nodes {names[:5]}): "
                         f"the model needs a pattern the passes do not fuse")
    return g, w, records
