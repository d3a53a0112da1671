"""Passes that transform weights along with the graph: (Graph, weights) -> (Graph, weights, records).

Weights keep their checkpoint dtype through the passes (merges and row permutations are exact in any dtype),
folds compute in fp32, and every weight is cast to the build dtype last. Each record says how one weight was
made, for the manifest: {"op", "inputs": [weight names], "output", ...}.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from artifact_format.graph import QUANT_PAIRS, Graph, TensorSpec
from compiler.ops import node_label
from compiler.passes.rewrite import Edit, make_node, merged_name, rebuild
from kernels.rope_epilogue import RopeEpilogue
from kernels.weight_quant import INT4_DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, quantize_int4, quantize_int8

Weights = dict[str, torch.Tensor]
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "i8": torch.int8,
                "u8": torch.uint8}
# The graph dtype of each scheme's quantized weight: int8 values, or two int4 values per byte.
QUANT_DTYPES = {"int8": "i8", "int4": "u8"}
QUANTIZED_OPS = tuple(QUANT_PAIRS)


def merge_linears(g: Graph, weights: Mapping[str, torch.Tensor]) -> tuple[Graph, Weights, list[dict]]:
    """concat of linears over one input -> one linear whose weight (and bias) rows are theirs in concat order.

    q, k, v -> qkv (q rows, then k, then v); gate, up -> gate_up (gate rows first, as silu_mul reads them).
    """
    e, out, records = Edit(g), dict(weights), []
    for node in g.nodes:
        if node.op != "concat":
            continue
        lins = [e.producer(name, "linear", user=node) for _, name in node.inputs]
        # Rule: every concat operand is a plain linear read only by the concat, all over the same x, all with
        # a bias or all without; otherwise a known non-fusion (the concat stays and optimize reports it).
        if not all(lins) or len({(n.input("x"), bool(n.attr("has_bias"))) for n in lins}) != 1:
            continue
        if any(n.attr("has_residual") for n in lins) or len({e.spec(n.output("out")).dtype for n in lins}) != 1:
            continue
        roles = ["w", "bias"] if lins[0].attr("has_bias") else ["w"]
        merged = {}
        for role in roles:
            parts = [n.input(role) for n in lins]
            name = e.fresh(merged_name(parts))
            out[name] = torch.cat([weights[p] for p in parts], dim=0)
            first = g.tensor(parts[0])
            e.add_spec(TensorSpec(name, first.dtype, tuple(out[name].shape), "weight"))
            records.append({"op": "concat", "inputs": parts, "output": name, "axis": 0})
            merged[role] = name
        fused = make_node("linear", node_label(merged["w"]), {"x": lins[0].input("x"), "w": merged["w"],
                                                              "bias": merged.get("bias")},
                          {"out": node.output("out")}, has_bias="bias" in merged, has_residual=False)
        e.replace([*lins, node], fused, at=node)
    return e.graph(), out, records


def fold_norms(g: Graph, weights: Mapping[str, torch.Tensor], in_kernel: bool = False
               ) -> tuple[Graph, Weights, list[dict]]:
    """rms_norm -> linear(s) -> rms_norm_linear with W' = W diag(g): rstd scales each row, g sits in W'.

    in_kernel (quantized builds): W stays as it is and the node takes g as input norm_w, attr use_norm_w, for the
    kernel to apply to x. A quantized W' would be rounded on a grid the column scaling moved (a GGUF's Q4_1 groups of
    W are exact on theirs; those of W diag(g) are not): SmolLM2-135M at int4 group 32, +44% perplexity folded.
    """
    e, out, records = Edit(g), dict(weights), []
    folded: dict[tuple[str, str], str] = {}
    for node in g.nodes:
        if node.op != "rms_norm" or node.name in e.taken or node.attr("has_residual"):
            continue
        users = e.consumers.get(node.output("out"), [])
        # Rule: fold only when every reader of the norm output is a plain linear (no residual epilogue);
        # any other reader needs the normed activations themselves (a known non-fusion).
        if not users or node.output("out") in g.outputs or not all(
                u.op == "linear" and not u.attr("has_residual") and u.name not in e.taken for u in users):
            continue
        gamma = weights[node.input("w")]
        new = []
        for u in users:
            if in_kernel:
                new.append(make_node("rms_norm_linear", u.name, {"x": node.input("x"), "w": u.input("w"),
                                                                 "norm_w": node.input("w"), "bias": u.input("bias")},
                                     {"out": u.output("out")}, eps=node.attr("eps"),
                                     has_bias=bool(u.attr("has_bias")), use_norm_w=True))
                continue
            key = (u.input("w"), node.input("w"))
            if key not in folded:
                name = e.fresh(u.input("w").removesuffix(".weight") + ".folded.weight")
                out[name] = _fold(weights[u.input("w")], gamma, TORCH_DTYPES[g.tensor(u.input("w")).dtype])
                e.add_spec(TensorSpec(name, g.tensor(u.input("w")).dtype, tuple(out[name].shape), "weight"))
                records.append({"op": "fold_rms_norm", "inputs": list(key), "output": name})
                folded[key] = name
            new.append(make_node("rms_norm_linear", u.name, {"x": node.input("x"), "w": folded[key],
                                                             "bias": u.input("bias")},
                                 {"out": u.output("out")}, eps=node.attr("eps"), has_bias=bool(u.attr("has_bias"))))
        e.replace([node], [], at=node)
        for u, n in zip(users, new):
            e.replace([u], n, at=u)
    return e.graph(), out, records


def _fold(w: torch.Tensor, gamma: torch.Tensor, build: torch.dtype) -> torch.Tensor:
    """W diag(g) in fp32 (one pass: a 16-bit operand promotes inside the multiply, no fp32 copy of W).

    A W already in the build dtype is rounded to it right away: that is the same one rounding of the same fp32
    product cast_weights would do, at half the bytes for the passes after. Otherwise the product stays fp32.
    """
    product = w * gamma.to(torch.float32)[None, :]
    return product.to(build) if w.dtype == build else product


def interleave_pairs(w: torch.Tensor) -> torch.Tensor:
    """[2I, ...] gate rows then up rows -> [2I, ...] with row 2j = gate_j, row 2j + 1 = up_j."""
    return w.unflatten(0, (2, w.shape[0] // 2)).transpose(0, 1).flatten(0, 1).contiguous()


_GLU_SUFFIX = {"silu_mul": "swiglu", "gelu_tanh_mul": "geglu"}


def fuse_swiglu(g: Graph, weights: Mapping[str, torch.Tensor]) -> tuple[Graph, Weights, list[dict]]:
    """rms_norm_linear(gate_up) -> silu_mul -> one rms_norm_linear with act "silu_mul" over interleaved rows.

    The kernel's epilogue pairs adjacent output columns (gate_j, up_j) within one tile, so the gate_up weight
    (and bias) rows are interleaved here; the fused node writes silu_mul's [T, I] output directly. GeGLU's
    gelu_tanh_mul fuses the same way, into act "gelu_tanh_mul".
    """
    e, out, records = Edit(g), dict(weights), []
    for node in g.nodes:
        # Rule: a silu_mul (or gelu_tanh_mul) whose x is the output of an rms_norm_linear without act, read by
        # nothing else, of the same dtype (the epilogue writes the linear's dtype); otherwise the two launches stay.
        glu = node.op in _GLU_SUFFIX
        lin = e.producer(node.input("x"), "rms_norm_linear", user=node) if glu else None
        if lin is None or lin.attr("act") or e.spec(lin.output("out")).dtype != e.spec(node.output("out")).dtype:
            continue
        roles = ["w", "bias"] if lin.attr("has_bias") else ["w"]
        new = {}
        for role in roles:
            src = lin.input(role)
            suffix = {"w": "weight", "bias": "bias"}[role]
            name = e.fresh(src.removesuffix(f".{suffix}") + f".{_GLU_SUFFIX[node.op]}.{suffix}")
            out[name] = interleave_pairs(weights[src])
            e.add_spec(TensorSpec(name, g.tensor(src).dtype, tuple(out[name].shape), "weight"))
            records.append({"op": "interleave_rows", "inputs": [src], "output": name, "groups": 2})
            new[role] = name
        fused = make_node("rms_norm_linear", lin.name, {"x": lin.input("x"), "w": new["w"],
                                                        "norm_w": lin.input("norm_w"), "bias": new.get("bias")},
                          {"out": node.output("out")}, **{**dict(lin.attrs), "act": node.op})
        e.replace([lin, node], fused, at=node)
    return e.graph(), out, records


def fuse_rope_epilogue(g: Graph, weights: Mapping[str, torch.Tensor]) -> tuple[Graph, Weights, list[dict]]:
    """linear / rms_norm_linear (qkv) -> rope -> one matmul node with act "rope": the rotation, and with write_cache
    the KV-cache write, run in the matmul's epilogue, a launch fewer per layer.

    The q and k heads' weight (and bias) rows are reordered so that each rotation pair is two adjacent output
    columns (kernels/rope_epilogue.py, RopeEpilogue.row_order); the epilogue stores every value back at its own
    column, so the fused node's qkv is the rope's (same name, same layout) and attention reads it unchanged. The
    node takes over the rope's extra inputs (positions, cos_sin; slot_mapping and the caches with write_cache) and
    its cache outputs under their names.
    """
    e, out, records = Edit(g), dict(weights), []
    for node in g.nodes:
        if node.op != "rope":
            continue
        # Known non-fusions, which keep the rope kernel: Qwen3's q/k norm needs whole heads (a sum over each head's
        # columns, which the tiles cut across), and an odd head_dim would put a column pair across two heads.
        if node.attr("use_qk_norm") or node.attr("head_dim") % 2:
            continue
        # Rule: a rope whose qkv is the output of a linear or rms_norm_linear without act or residual, read by
        # nothing else (attention reads the rope's qkv, which the fused node then writes).
        lin = next((p for op in ("rms_norm_linear", "linear")
                    if (p := e.producer(node.input("qkv"), op, user=node)) is not None), None)
        if lin is None or lin.attr("act") or lin.attr("has_residual"):
            continue
        rope = RopeEpilogue.from_attrs(dict(node.attrs))
        order = rope.row_order()
        new = {"w": lin.input("w"), "bias": lin.input("bias")}
        if not torch.equal(order, torch.arange(rope.width)):  # GPT-J pairs are adjacent already: rows as they are
            for role in [r for r in ("w", "bias") if new[r]]:
                src = new[role]
                suffix = {"w": "weight", "bias": "bias"}[role]
                name = e.fresh(src.removesuffix(f".{suffix}") + f".rope.{suffix}")
                out[name] = weights[src][order].contiguous()
                e.add_spec(TensorSpec(name, g.tensor(src).dtype, tuple(out[name].shape), "weight"))
                records.append({"op": "pair_rotary_rows", "inputs": [src], "output": name,
                                **{k: v for k, v in rope.attrs().items() if k != "write_cache"}})
                new[role] = name
        extra = ("positions", "cos_sin", "slot_mapping", "k_cache", "v_cache")
        outputs = {"out": node.output("qkv"), **{c: node.output(c) for c in ("k_cache", "v_cache") if node.output(c)}}
        fused = make_node(lin.op, lin.name, {**dict(lin.inputs), **new, **{r: node.input(r) for r in extra}}, outputs,
                          **{**dict(lin.attrs), "act": "rope", **rope.attrs()})
        e.replace([lin, node], fused, at=node)
    return e.graph(), out, records


def eliminate_dead(g: Graph, weights: Mapping[str, torch.Tensor]) -> tuple[Graph, Weights, list[dict]]:
    """Drop nodes nothing reads (transitively from the graph outputs) and weights no node uses."""
    live, keep = set(g.outputs), []
    for node in reversed(g.nodes):
        if any(name in live for _, name in node.outputs):
            keep.append(node)
            live.update(name for _, name in node.inputs)
    dead = rebuild(g, keep[::-1])
    return dead, {t.name: weights[t.name] for t in dead.by_kind("weight")}, []


def quantize_weights(g: Graph, weights: Mapping[str, torch.Tensor], scheme: str = "int8",
                     group_size: int | None = None) -> tuple[Graph, Weights, list[dict]]:
    """Every linear / rms_norm_linear weight, the embedding table and the lm_head -> the ``scheme``'s storage
    (kernels/weight_quant.py): "int8", int8 rows with an fp32 scale per output channel (per vocabulary row for the
    tables); "int4", packed u8 [N, K / 2] with fp32 (scale, min) per group of ``group_size`` along K (D for the
    tables), [N, K / G, 2]. The node gains the scale input (`scale`; `weight_scale` on embedding and logits) and the
    attr quant (and group_size); embedding also out_dtype, the build dtype its rows are dequantized to. A table tied
    to the lm_head is quantized once, and both nodes read the same tensors.

    Runs after every pass that rewrites weights (merges, the GLU interleave, the rope row pairing; with --quant
    fold_norms leaves the norm weights out, in_kernel), so the rows quantized are exactly the rows the kernel reads;
    the values quantized are the source's fp32 (or checkpoint-dtype) values, never a build-dtype rounding of them.
    Biases stay in the build dtype.
    ValueError (one line, naming the tensor) when a weight's K is not a multiple of the int4 group size.
    """
    if scheme == "int4":
        group_size = group_size or INT4_DEFAULT_GROUP_SIZE
        # (node, weight, the size its groups run along: a matmul's K, a table's D, an expert stack's last axis)
        ks = [(n, w, g.tensor(w).shape[-1]) for n in g.nodes if n.op in QUANTIZED_OPS
              for _, w, _ in _pairs(n)]
        bad = next(((n, w, K) for n, w, K in ks if K % group_size), None)
        if bad:
            fits = [s for s in INT4_GROUP_SIZES if all(K % s == 0 for _, _, K in ks)]
            advice = f"--group-size {' or '.join(map(str, fits))}" if fits else "no int4 group size fits"
            dim = "D" if bad[0].op in ("embedding", "logits") else "K"
            raise ValueError(f"--quant int4 --group-size {group_size}: {bad[1]} (node {bad[0].name}) has {dim} = "
                             f"{bad[2]}, not a multiple of {group_size}: use {advice}, or --quant int8")
    e, out, records = Edit(g), dict(weights), []
    done: dict[str, tuple[str, str]] = {}
    attrs = {"quant": scheme, **({"group_size": group_size} if scheme == "int4" else {})}
    for node in g.nodes:
        if node.op not in QUANTIZED_OPS or node.attr("quant"):
            continue
        inputs = dict(node.inputs)
        for w_role, src, s_role in _pairs(node):
            if src not in done:
                base = src.removesuffix(".weight")
                q_name, s_name = e.fresh(f"{base}.{scheme}.weight"), e.fresh(f"{base}.{scheme}.scale")
                out[q_name], out[s_name] = _quantize(weights[src], scheme, group_size)
                if scheme == "int4":
                    record = {"group_size": group_size, "per": f"group of {group_size} along K", "scale_layout":
                              "[N, K / group_size, 2] (scale, min)", "packing": "low nibble even k, high nibble odd k"}
                else:
                    record = {"per": "output channel"}
                if weights[src].dim() == 3:
                    record["experts"] = "each [N, K] matrix of the [E, N, K] stack quantized on its own"
                e.add_spec(TensorSpec(q_name, QUANT_DTYPES[scheme], tuple(out[q_name].shape), "weight"))
                e.add_spec(TensorSpec(s_name, "fp32", tuple(out[s_name].shape), "weight"))
                records.append({"op": f"quantize_{scheme}", "inputs": [src], "output": q_name, "scale": s_name,
                                **record})
                done[src] = (q_name, s_name)
            inputs[w_role], inputs[s_role] = done[src]
        extra = {"out_dtype": g.get_meta("dtype")} if node.op == "embedding" else {}
        e.replace([node], make_node(node.op, node.name, inputs, dict(node.outputs),
                                    **{**dict(node.attrs), **attrs, **extra}), at=node)
    g2 = e.graph()
    return g2, {t.name: out[t.name] for t in g2.by_kind("weight")}, records


def _pairs(node) -> list[tuple[str, str, str]]:
    """(weight role, weight tensor, scale role) of each weight the node's op quantizes."""
    return [(w_role, node.input(w_role), s_role) for w_role, s_role in QUANT_PAIRS[node.op]]


def _quantize(w: torch.Tensor, scheme: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A matmul weight [N, K] or a stack of expert weights [E, N, K] in the scheme: both schemes are per row (int4
    per group along a row), so a stack is quantized as its E * N rows and keeps its leading axes."""
    flat = w.reshape(-1, w.shape[-1])
    q, scale = quantize_int4(flat, group_size) if scheme == "int4" else quantize_int8(flat)
    return q.reshape(*w.shape[:-1], q.shape[-1]), scale.reshape(*w.shape[:-1], *scale.shape[1:])


def cast_weights(g: Graph, weights: Mapping[str, torch.Tensor]) -> tuple[Graph, Weights, list[dict]]:
    """Every weight to its TensorSpec dtype (the build dtype; cos_sin and int8 / int4 scales stay fp32, quantized
    weights i8 / u8)."""
    out, records = {}, []
    for t in g.by_kind("weight"):
        value = weights[t.name]
        out[t.name] = value.to(TORCH_DTYPES[t.dtype]).contiguous()
        if value.dtype != out[t.name].dtype:
            records.append({"op": "cast", "inputs": [t.name], "output": t.name, "dtype": t.dtype})
    return g, out, records
