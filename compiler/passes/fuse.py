"""Fusions that rewrite structure only (no weight changes): each is a pure function Graph -> Graph."""

from __future__ import annotations

from artifact_format.graph import Graph, TensorSpec
from compiler.passes.rewrite import Edit, make_node, renamed


def fuse_silu_mul(g: Graph) -> Graph:
    """silu(gate) * up -> silu_mul over concat(gate, up): the kernel reads gate from the first I columns."""
    e = Edit(g)
    for node in g.nodes:
        if node.op != "mul":
            continue
        for gate_role, up_role in (("a", "b"), ("b", "a")):
            # Rule: a mul one of whose operands is a silu read by nothing else.
            act = e.producer(node.input(gate_role), "silu", user=node)
            if act is None:
                continue
            gate, up, out = act.input("x"), node.input(up_role), e.spec(node.output("out"))
            scope = node.name.rpartition(".")[0]
            pair = e.add_spec(TensorSpec(e.fresh(f"{scope}.gate_up" if scope else "gate_up"), out.dtype,
                                         (out.shape[0], 2 * out.shape[1]), "activation"))
            cat = make_node("concat", pair.name, {"x0": gate, "x1": up}, {"out": pair.name})
            fused = make_node("silu_mul", renamed(node.name, "mul", "silu_mul"), {"x": pair.name}, {"out": out.name})
            e.replace([act, node], [cat, fused], at=node)
            break
    return e.graph()


def fuse_qk_norm_rope(g: Graph) -> Graph:
    """qk_norm then rope -> rope with use_qk_norm (Qwen3): the kernel norms each q/k head before rotating it."""
    e = Edit(g)
    for node in g.nodes:
        # Rule: a rope whose qkv comes from a qk_norm read by nothing else.
        norm = e.producer(node.input("qkv"), "qk_norm", user=node) if node.op == "rope" else None
        if norm is None or node.attr("use_qk_norm"):
            continue
        fused = make_node("rope", node.name, {"qkv": norm.input("qkv"), "positions": node.input("positions"),
                                              "cos_sin": node.input("cos_sin"), "q_norm": norm.input("q_norm"),
                                              "k_norm": norm.input("k_norm")},
                          dict(node.outputs), **{**dict(node.attrs), "use_qk_norm": True, "eps": norm.attr("eps")})
        e.replace([norm, node], fused, at=node)
    return e.graph()


def fuse_rope_cache_write(g: Graph) -> Graph:
    """rope then kv_cache_write of its output -> one rope with write_cache: a launch fewer per layer.

    The fused node keeps rope's qkv output (attention reads q there) and takes over the write's cache outputs
    under their names, so attention reads the caches the fused node produces.
    """
    e = Edit(g)
    heads = ("num_q_heads", "num_kv_heads", "head_dim")
    for node in g.nodes:
        # Rule: a kv_cache_write of a plain rope's qkv output (the rope's other readers, attention, stay),
        # both over the same head layout.
        rope = e.producer(node.input("qkv"), "rope") if node.op == "kv_cache_write" else None
        if rope is None or rope.attr("write_cache") or any(rope.attr(k) != node.attr(k) for k in heads):
            continue
        fused = make_node("rope", rope.name, {**dict(rope.inputs), "slot_mapping": node.input("slot_mapping"),
                                              "k_cache": node.input("k_cache"), "v_cache": node.input("v_cache")},
                          {**dict(rope.outputs), "k_cache": node.output("k_cache"), "v_cache": node.output("v_cache")},
                          **{**dict(rope.attrs), "write_cache": True})
        e.replace([rope, node], fused, at=rope)
    return e.graph()


def fuse_residual(g: Graph) -> Graph:
    """linear + add -> linear with the residual-add epilogue (out = x @ w^T + bias + residual)."""
    e = Edit(g)
    for node in g.nodes:
        if node.op != "add":
            continue
        for lin_role, res_role in (("a", "b"), ("b", "a")):
            # Rule: an add one of whose operands is a plain linear's output read by nothing else.
            lin = e.producer(node.input(lin_role), "linear", user=node)
            if lin is None or lin.attr("has_residual"):
                continue
            if e.spec(lin.output("out")).dtype != e.spec(node.output("out")).dtype:
                continue  # known non-fusion: the epilogue writes the linear's own dtype
            fused = make_node("linear", lin.name, {"x": lin.input("x"), "w": lin.input("w"),
                                                   "bias": lin.input("bias"), "residual": node.input(res_role)},
                              {"out": node.output("out")}, has_bias=bool(lin.attr("has_bias")), has_residual=True)
            e.replace([lin, node], fused, at=node)
            break
    return e.graph()


def fuse_norm_residual(g: Graph) -> Graph:
    """rms_norm + add -> rms_norm with the residual-add epilogue (out = residual + norm(x) * w): Gemma's sandwich
    norms, where the add after a sublayer follows its post-norm instead of a linear."""
    e = Edit(g)
    for node in g.nodes:
        if node.op != "add":
            continue
        for norm_role, res_role in (("a", "b"), ("b", "a")):
            # Rule: an add one of whose operands is a plain rms_norm's output read by nothing else, of the add's
            # dtype (the epilogue writes the norm's own dtype).
            norm = e.producer(node.input(norm_role), "rms_norm", user=node)
            if norm is None or norm.attr("has_residual"):
                continue
            if e.spec(norm.output("out")).dtype != e.spec(node.output("out")).dtype:
                continue
            fused = make_node("rms_norm", norm.name, {"x": norm.input("x"), "w": norm.input("w"),
                                                      "residual": node.input(res_role)},
                              {"out": node.output("out")}, eps=norm.attr("eps"), has_residual=True)
            e.replace([norm, node], fused, at=node)
            break
    return e.graph()


def fuse_logits(g: Graph) -> Graph:
    """rms_norm -> gather(last_idx) -> fp32 linear -> logits: norm and lm_head on the wanted rows only."""
    e = Edit(g)
    for node in g.nodes:
        if node.op != "linear" or node.attr("has_bias") or node.attr("has_residual"):
            continue
        if e.spec(node.output("out")).dtype != "fp32":
            continue
        # Rule: an fp32, bias-free linear of gathered rows of an RMSNorm, each step read by the next only.
        rows = e.producer(node.input("x"), "gather", user=node)
        norm = rows and e.producer(rows.input("x"), "rms_norm", user=rows)
        if not norm or norm.attr("has_residual"):
            continue
        fused = make_node("logits", node.name, {"x": norm.input("x"), "norm_w": norm.input("w"),
                                                "weight": node.input("w"), "last_idx": rows.input("idx")},
                          {"out": node.output("out")}, eps=norm.attr("eps"))
        e.replace([norm, rows, node], fused, at=node)
    return e.graph()


def fuse_add_rms_norm(g: Graph) -> Graph:
    """add + rms_norm -> add_rms_norm, writing both the normed output and the sum (the residual stream).

    Runs after fuse_residual, so it only meets adds no linear epilogue could take; it wins over folding
    the norm into a following linear, which would leave such an add with no kernel.
    """
    e = Edit(g)
    for node in g.nodes:
        # Rule: an rms_norm of an add's output; the add's output may have other readers.
        add = e.producer(node.input("x"), "add") if node.op == "rms_norm" else None
        if add is None or node.attr("has_residual"):
            continue
        fused = make_node("add_rms_norm", node.name, {"x": add.input("a"), "residual": add.input("b"),
                                                      "w": node.input("w")},
                          {"out": node.output("out"), "residual_out": add.output("out")}, eps=node.attr("eps"))
        e.replace([add, node], fused, at=node)
    return e.graph()
