import copy
import dataclasses

import pytest
import torch

from artifact_format.graph import GRAPH_OPS
from compiler import ops
from compiler.ops import Tracer
from compiler.passes import optimize
from tests.compiler.graph_eval import LIMITS, MODELS, SEQS, evaluate, hf_logits, prefill_feeds, traced

# Per decoder layer: the qkv matmul with the rope and KV-cache write in its epilogue, attention, o (+residual),
# gate_up (SwiGLU epilogue), down (+residual). Qwen3's q/k norm keeps its rope kernel: a known non-fusion.
FUSED_LAYER = ["rms_norm_linear", "attention", "linear", "rms_norm_linear", "linear"]
QWEN3_LAYER = ["rms_norm_linear", "rope", "attention", "linear", "rms_norm_linear", "linear"]


def optimized(name, dtype="fp32"):
    graph, weights, config, tensors, model = traced(name, dtype)
    fused, fused_w, records = optimize(graph, weights, dtype)
    return graph, weights, fused, fused_w, records, model


def layer(graph, i):
    return [n for n in graph.nodes if n.name.startswith(f"layers.{i}.")]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_each_layer_is_five_kernels(name):
    traced_graph, _, g, _, _, _ = optimized(name)
    per_layer = QWEN3_LAYER if name == "qwen3" else FUSED_LAYER
    assert [n.op for n in g.nodes] == ["embedding", *per_layer * 2, "logits"]
    assert all(n.op in GRAPH_OPS for n in g.nodes)
    assert sum(n.op == "rope" for n in traced_graph.nodes) == 2  # one rope per layer before the passes
    for i in range(2):
        if name == "qwen3":
            qkv, rope, attn, o, gate_up, down = layer(g, i)
            writer, qkv_out = rope, rope.output("qkv")
            assert rope.attr("use_qk_norm") and rope.attr("write_cache") and qkv.attr("act") is None
            assert (rope.input("q_norm"), rope.input("k_norm")) == (
                f"model.layers.{i}.self_attn.q_norm.weight", f"model.layers.{i}.self_attn.k_norm.weight")
            assert rope.input("qkv") == qkv.output("out")
        else:
            qkv, attn, o, gate_up, down = layer(g, i)
            writer, qkv_out = qkv, qkv.output("out")
            # rope (with kv_cache_write in it) went into the qkv matmul's epilogue over paired q/k rows.
            assert qkv.attr("act") == "rope" and qkv.attr("write_cache") is True and qkv.attr("is_neox") is True
            assert qkv.input("positions") == "positions" and qkv.input("cos_sin") == "rope.cos_sin"
            assert qkv.input("w").endswith(".rope.weight")
            assert (qkv.attr("num_q_heads"), qkv.attr("num_kv_heads")) == (g.get_meta("num_q_heads"),
                                                                            g.get_meta("num_kv_heads"))
            assert qkv.attr("rotary_dim") == g.get_meta("rotary_dim") < g.get_meta("head_dim") if name == "phi3" \
                else qkv.attr("rotary_dim") == g.get_meta("head_dim")
        assert qkv.name == f"layers.{i}.self_attn.qkv_proj" and gate_up.name == f"layers.{i}.mlp.gate_up_proj"
        assert qkv.attr("has_bias") is (name == "qwen2") and bool(qkv.input("bias")) is (name == "qwen2")
        assert not gate_up.attr("has_bias") and o.attr("has_residual") and down.attr("has_residual")
        # silu_mul went into gate_up's epilogue: [T, 2I] interleaved rows in, [T, I] out.
        assert gate_up.attr("act") == "silu_mul"
        assert g.tensor(gate_up.output("out")).shape[1] * 2 == g.tensor(gate_up.input("w")).shape[0]
        # The cache write went along: the writer updates layer i's caches, attention reads the caches it produces.
        assert writer.input("slot_mapping") == "slot_mapping"
        assert (writer.input("k_cache"), writer.input("v_cache")) == (f"k_cache.{i}", f"v_cache.{i}")
        assert (attn.input("k_cache"), attn.input("v_cache")) == (writer.output("k_cache"), writer.output("v_cache"))
        assert [g.storage(writer.output(c)) for c in ("k_cache", "v_cache")] == [f"k_cache.{i}", f"v_cache.{i}"]
        # The data flows through the fused chain, each node reading the one before.
        assert attn.input("qkv") == qkv_out
        assert o.input("x") == attn.output("out") and down.input("x") == gate_up.output("out")


def test_residual_stream_starts_at_the_embedding():
    _, _, g, _, _, _ = optimized("llama")
    emb = g.nodes[0].output("out")
    qkv0, *_, o0, gate_up0, down0 = layer(g, 0)
    qkv1, *_, o1, _, down1 = layer(g, 1)
    # Layer 0 norms the embedding and adds the attention output to it; each later add takes the stream so far.
    assert qkv0.input("x") == emb and o0.input("residual") == emb
    assert gate_up0.input("x") == o0.output("out") and down0.input("residual") == o0.output("out")
    assert qkv1.input("x") == down0.output("out") and o1.input("residual") == down0.output("out")
    assert g.nodes[-1].input("x") == down1.output("out") and g.nodes[-1].output("out") == "logits"


# kernel_refs=False runs every op through the test's own maths, so the check stands without kernels/.
@pytest.mark.parametrize("name,kernel_refs", [(n, True) for n in MODELS] + [("llama3-tied", False), ("qwen2", False),
                                                                            ("qwen3", False), ("mistral-swa", False)])
def test_fused_graph_gives_the_same_logits(name, kernel_refs):
    graph, weights, fused, fused_w, _, model = optimized(name)
    feeds = prefill_feeds(graph, LIMITS, SEQS)
    ref = torch.stack([hf_logits(model, s)[-1] for s in SEQS])
    unfused = evaluate(graph, weights, {k: v.clone() for k, v in feeds.items()}, kernel_refs)["logits"]
    got = evaluate(fused, fused_w, feeds, kernel_refs)["logits"]
    assert ((got - unfused).norm() / unfused.norm()).item() <= 1e-5
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-4


def test_weight_transforms():
    graph, w, fused, fw, records, _ = optimized("qwen2")
    p = "model.layers.1."
    g_in, g_post = w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"]
    qkv = torch.cat([w[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]) * g_in
    gate, up = w[p + "mlp.gate_proj.weight"] * g_post, w[p + "mlp.up_proj.weight"] * g_post
    # The SwiGLU epilogue reads gate_j and up_j from adjacent rows 2j and 2j + 1.
    swiglu = fw[p + "mlp.gate_up_proj.folded.swiglu.weight"]
    torch.testing.assert_close(swiglu[0::2], gate, rtol=0, atol=0)
    torch.testing.assert_close(swiglu[1::2], up, rtol=0, atol=0)
    assert {"op": "concat", "inputs": [p + f"self_attn.{x}_proj.bias" for x in "qkv"],
            "output": p + "self_attn.qkv_proj.bias", "axis": 0} in records
    assert {"op": "fold_rms_norm", "inputs": [p + "mlp.gate_up_proj.weight", p + "post_attention_layernorm.weight"],
            "output": p + "mlp.gate_up_proj.folded.weight"} in records
    assert {"op": "interleave_rows", "inputs": [p + "mlp.gate_up_proj.folded.weight"],
            "output": p + "mlp.gate_up_proj.folded.swiglu.weight", "groups": 2} in records
    # The rope epilogue reads rotation pair (j, j + Dr/2) of every q and k head from adjacent rows 2j, 2j + 1; the v
    # rows stay. The bias moves with its rows.
    heads = {k: fused.get_meta(k) for k in ("num_q_heads", "num_kv_heads", "head_dim")}
    Hq, Hk, Dh = heads.values()
    half = Dh // 2
    rope_w, rope_b = fw[p + "self_attn.qkv_proj.folded.rope.weight"], fw[p + "self_attn.qkv_proj.rope.bias"]
    bias = torch.cat([w[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
    for folded, paired in ((qkv, rope_w), (bias, rope_b)):
        qk, qk_paired = folded[:(Hq + Hk) * Dh].unflatten(0, (Hq + Hk, Dh)), paired[:(Hq + Hk) * Dh]
        torch.testing.assert_close(qk_paired.unflatten(0, (Hq + Hk, half, 2))[:, :, 0], qk[:, :half], rtol=0, atol=0)
        torch.testing.assert_close(qk_paired.unflatten(0, (Hq + Hk, half, 2))[:, :, 1], qk[:, half:], rtol=0, atol=0)
        torch.testing.assert_close(paired[(Hq + Hk) * Dh:], folded[(Hq + Hk) * Dh:], rtol=0, atol=0)
    assert {"op": "pair_rotary_rows", "inputs": [p + "self_attn.qkv_proj.folded.weight"],
            "output": p + "self_attn.qkv_proj.folded.rope.weight", **heads, "rotary_dim": Dh,
            "is_neox": True} in records
    # Dead weights are gone, and every weight the graph names is there.
    assert set(fw) == {t.name for t in fused.by_kind("weight")}
    assert set(fw) == {name for n in fused.nodes for _, name in n.inputs if fused.tensor(name).kind == "weight"}
    assert p + "self_attn.q_proj.weight" not in fw and p + "input_layernorm.weight" not in fw
    assert p + "self_attn.qkv_proj.folded.weight" not in fw and p + "self_attn.qkv_proj.bias" not in fw


def test_cast_to_bf16_after_folding_in_fp32():
    _, w, fused, fw, records, _ = optimized("llama3-tied", "bf16")
    assert fw["rope.cos_sin"].dtype == torch.float32 and fused.tensor("rope.cos_sin").dtype == "fp32"
    assert all(v.dtype == torch.bfloat16 for k, v in fw.items() if k != "rope.cos_sin")
    p = "model.layers.0."
    folded = (torch.stack([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]], dim=1).flatten(0, 1)
              * w[p + "post_attention_layernorm.weight"]).to(torch.bfloat16)
    assert torch.equal(fw[p + "mlp.gate_up_proj.folded.swiglu.weight"], folded)
    casts = {r["output"] for r in records if r["op"] == "cast"}
    assert casts == set(fw) - {"rope.cos_sin"} and all(r["dtype"] == "bf16" for r in records if r["op"] == "cast")
    # Tied: the logits node reads the embedding tensor itself; there is no copy.
    assert fused.nodes[-1].input("weight") == fused.nodes[0].input("weight") == "model.embed_tokens.weight"
    assert not any("lm_head" in k for k in fw)


def test_optimize_is_pure():
    graph, weights, *_ = traced("qwen3")
    before_graph, before_w = copy.deepcopy(graph), {k: v.clone() for k, v in weights.items()}
    optimize(graph, weights, "fp32")
    assert graph == before_graph and weights.keys() == before_w.keys()
    assert all(torch.equal(weights[k], before_w[k]) for k in weights)
    with pytest.raises(ValueError, match="traced for fp32"):
        optimize(graph, weights, "fp16")


def _side_graph():
    """Two embeddings summed (no linear to take the add), a norm read by a linear and by a second norm."""
    g = torch.Generator().manual_seed(7)
    t = Tracer("fp32")
    ids = t.source("ids", "i32", ("T",), "input")
    idx = t.source("last_idx", "i32", ("R",), "input")
    w = lambda name, *shape: t.weight(name, torch.randn(*shape, generator=g) / 3 + (1 if len(shape) == 1 else 0))
    s = ops.add(ops.embedding(ids, w("a.weight", 11, 8)), ops.embedding(ids, w("b.weight", 11, 8)), name="sum")
    n = ops.rms_norm(s, w("n1.weight", 8), 1e-6)
    h = ops.add(ops.linear(n, w("p.weight", 8, 8)), s, name="h")
    h = ops.add(ops.linear(ops.rms_norm(n, w("n2.weight", 8), 1e-6), w("q.weight", 8, 8)), h, name="h2")
    x = ops.gather(ops.rms_norm(h, w("final.weight", 8), 1e-6), idx)
    logits = ops.linear(x, w("head.weight", 13, 8), out_dtype="fp32", name="logits")
    return t.graph({"logits": logits}, {"dtype": "fp32"}), dict(t.weights)


def test_add_without_a_linear_becomes_add_rms_norm():
    graph, weights = _side_graph()
    fused, fw, _ = optimize(graph, weights, "fp32")
    by_op = {n.op: n for n in fused.nodes}
    assert sorted(n.op for n in fused.nodes) == sorted(["embedding", "embedding", "add_rms_norm", "linear", "rms_norm",
                                                        "linear", "logits"])
    # n1 feeds a norm as well as a linear: it is not folded, and takes the add instead.
    fused_add = by_op["add_rms_norm"]
    assert fused_add.output("residual_out") == "sum" and fused_add.input("w") == "n1.weight"
    # The second linear took the residual add, so n2 cannot fold into it: a known non-fusion.
    assert by_op["rms_norm"].input("w") == "n2.weight"
    assert all(n.attr("has_residual") for n in fused.nodes if n.op == "linear")
    feeds = {"ids": torch.tensor([3, 1, 4, 1, 5, 9, 2], dtype=torch.int32),
             "last_idx": torch.tensor([6, 2], dtype=torch.int32)}
    want = evaluate(graph, weights, feeds)["logits"]
    torch.testing.assert_close(evaluate(fused, fw, feeds)["logits"], want, rtol=1e-5, atol=1e-5)


def _attention_graph(with_rope: bool, is_neox: bool = True):
    """qkv -> [rope ->] kv_cache_write -> attention -> a linear to logits, over one layer's caches."""
    t = Tracer("fp32")
    g = torch.Generator().manual_seed(3)
    src = lambda name, *shape: t.source(name, "i32", shape, "input")
    heads = {"num_q_heads": 2, "num_kv_heads": 1, "head_dim": 4}
    qkv = ops.linear(ops.embedding(src("ids", "T"), t.weight("e.weight", torch.randn(9, 8, generator=g))),
                     t.weight("qkv.weight", torch.randn(16, 8, generator=g)))
    if with_rope:
        qkv = ops.rope(qkv, src("positions", "T"), t.weight("cs", torch.randn(32, 4, generator=g), "fp32"), eps=1e-6,
                       is_neox=is_neox, **heads)
    caches = [t.source(f"{c}_cache.0", "fp32", ("NB", 4, 1, 4), "cache") for c in "kv"]
    k, v = ops.kv_cache_write(qkv, src("slot_mapping", "T"), *caches, **heads)
    o = ops.attention(qkv, k, v, src("cu_seqlens_q", "S+1"), src("seq_lens", "S"), src("block_tables", "S", 8),
                      scale=0.5, **heads)
    logits = ops.linear(o, t.weight("head.weight", torch.randn(5, 8, generator=g)), out_dtype="fp32", name="logits")
    return t.graph({"logits": logits}, {"dtype": "fp32"}), dict(t.weights)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rope_and_cache_write_go_into_a_plain_linear(is_neox):
    # A qkv with no norm before it stays a linear; the rope (with the cache write it took in) becomes its epilogue.
    graph, weights = _attention_graph(with_rope=True, is_neox=is_neox)
    fused, fw, records = optimize(graph, weights, "fp32")
    assert [n.op for n in fused.nodes] == ["embedding", "linear", "attention", "linear"]
    qkv, attn = fused.nodes[1], fused.nodes[2]
    assert qkv.attr("act") == "rope" and qkv.attr("write_cache") and not qkv.attr("has_residual")
    assert dict(qkv.aliases) == {"k_cache": "k_cache", "v_cache": "v_cache"}
    assert (attn.input("k_cache"), attn.input("v_cache")) == (qkv.output("k_cache"), qkv.output("v_cache"))
    # GPT-J pairs are adjacent columns already: the weight is used as it is, no record.
    assert (qkv.input("w") == "qkv.weight") is (not is_neox)
    assert [r["op"] for r in records if r["op"] == "pair_rotary_rows"] == (["pair_rotary_rows"] if is_neox else [])
    feeds = prefill_feeds(graph, LIMITS, [[1, 2, 3, 4, 5, 6], [7, 8, 0]])
    for kernel_refs in (True, False):
        want = evaluate(graph, weights, {k: v.clone() for k, v in feeds.items()}, kernel_refs)["logits"]
        got = evaluate(fused, fw, {k: v.clone() for k, v in feeds.items()}, kernel_refs)["logits"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rope_takes_in_the_cache_write_only_after_a_rope():
    # With the qkv read by more than the rope, the rope stays a kernel of its own and takes in the cache write.
    graph, weights = _attention_graph(with_rope=True)
    qkv = next(n for n in graph.nodes if n.op == "linear")
    extra = graph.tensor(qkv.output("out"))
    kept = dataclasses.replace(graph, outputs=(*graph.outputs, extra.name),
                               tensors=tuple(dataclasses.replace(t, kind="output") if t is extra else t
                                             for t in graph.tensors))
    fused, _, _ = optimize(kept, weights, "fp32")
    assert [n.op for n in fused.nodes] == ["embedding", "linear", "rope", "attention", "linear"]
    rope, attn = fused.nodes[2], fused.nodes[3]
    assert rope.attr("write_cache") and dict(rope.aliases) == {"qkv": "qkv", "k_cache": "k_cache", "v_cache": "v_cache"}
    assert (attn.input("k_cache"), attn.input("v_cache")) == (rope.output("k_cache"), rope.output("v_cache"))
    # Known non-fusion: a model without rope keeps its kv_cache_write (it has no rope to join).
    plain, _, _ = optimize(*_attention_graph(with_rope=False), "fp32")
    assert [n.op for n in plain.nodes] == ["embedding", "linear", "kv_cache_write", "attention", "linear"]


def test_leftover_basic_op_is_an_error():
    t = Tracer("fp32")
    x = ops.embedding(t.source("ids", "i32", ("T",), "input"), t.weight("e.weight", torch.randn(5, 4)))
    out = ops.linear(ops.silu(x), t.weight("w.weight", torch.randn(3, 4)), out_dtype="fp32", name="logits")
    graph = t.graph({"logits": out}, {"dtype": "fp32"})
    with pytest.raises(ValueError, match="no kernel implements op.s. silu"):
        optimize(graph, dict(t.weights), "fp32")


# Gemma 3's q/k norms keep the rope kernel (as Qwen3's); Gemma 2's rope goes into the qkv matmul's epilogue.
GEMMA3_LAYER = ["rms_norm_linear", "rope", "attention", "linear", "rms_norm", "rms_norm_linear", "linear", "rms_norm"]
GEMMA2_LAYER = [op for op in GEMMA3_LAYER if op != "rope"]


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_each_gemma_layer_is_seven_or_eight_kernels(name):
    """Sandwich norms: the adds after the post-norms are those norms' epilogues (no add or add_rms_norm left), the
    (1 + w) pre-norms fold into qkv and gate_up, GeGLU goes into gate_up's epilogue, Gemma 2's rope into qkv's."""
    from artifact_format.graph import Limits
    from compiler.frontends import load_source
    from compiler.trace import trace

    src = load_source(name)
    graph, weights = trace(src.config, src.tensors, "fp32", Limits(max_seq_len=64, max_batch=4, max_num_tokens=64))
    g, w, _ = optimize(graph, weights, "fp32")
    per_layer = GEMMA2_LAYER if name == "tiny-gemma2" else GEMMA3_LAYER
    assert [n.op for n in g.nodes] == ["embedding", *per_layer * 2, "logits"]
    embed, logits = g.nodes[0], g.nodes[-1]
    assert embed.attr("scale") == 8.0 and embed.input("weight") == logits.input("weight") == "model.embed_tokens.weight"
    assert logits.attr("softcap") == (1.0 if name == "tiny-gemma2" else None)
    # The final norm's weight is 1 + w, in fp32, beside the checkpoint's w.
    torch.testing.assert_close(w[logits.input("norm_w")], 1 + src.tensors["model.norm.weight"].float())
    for i in range(2):
        nodes = layer(g, i)
        if name == "tiny-gemma2":  # the qkv matmul does the rope: its cos_sin and cache outputs are the rope's
            qkv, attn, o, post_attn, gate_up, down, post_ff = nodes
            rope = qkv
            assert qkv.attr("act") == "rope" and qkv.output("k_cache") == attn.input("k_cache")
        else:
            qkv, rope, attn, o, post_attn, gate_up, down, post_ff = nodes
            assert rope.attr("use_qk_norm") is True
        assert gate_up.attr("act") == "gelu_tanh_mul" and not o.attr("has_residual") and not down.attr("has_residual")
        assert post_attn.attr("has_residual") and post_attn.input("x") == o.output("out")
        assert post_ff.attr("has_residual") and post_ff.input("x") == down.output("out")
        assert gate_up.input("x") == post_attn.output("out") and post_ff.input("residual") == post_attn.output("out")
        assert attn.attr("window") == (4 if i == 0 else None)
        assert attn.attr("softcap") == (2.0 if name == "tiny-gemma2" else None)
        table = "rope.local_cos_sin" if name == "tiny-gemma3" and i == 0 else "rope.cos_sin"
        assert rope.input("cos_sin") == table


# A sparse layer: the qkv matmul (rope in its epilogue; Qwen3-MoE keeps its rope kernel for the q/k norms),
# attention, o (+residual), the post-attention norm (a known non-fusion: the router and the experts both read the
# normed hidden, so it stays a kernel), moe (router, gate_up, down + residual: three launches of one node).
MIXTRAL_LAYER = ["rms_norm_linear", "attention", "linear", "rms_norm", "moe"]
QWEN3_MOE_LAYER = ["rms_norm_linear", "rope", "attention", "linear", "rms_norm", "moe"]
# Qwen2-MoE's shared expert reads the same normed hidden, so its gate_up is a plain linear with a separate silu_mul
# (a known non-fusion: the norm cannot fold into it), then its down projection, read by the moe node.
QWEN2_MOE_LAYER = ["rms_norm_linear", "attention", "linear", "rms_norm", "linear", "silu_mul", "linear", "moe"]


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2-moe"])
def test_each_moe_layer_is_five_or_six_kernels(name):
    from artifact_format.graph import Limits
    from compiler.frontends import load_source
    from compiler.trace import trace

    src = load_source(name)
    graph, weights = trace(src.config, src.tensors, "fp32", Limits(max_seq_len=64, max_batch=4, max_num_tokens=64))
    g, w, _ = optimize(graph, weights, "fp32")
    if name == "tiny-mixtral":
        layers, legacy, top_k, renormalize = [MIXTRAL_LAYER] * 2, "block_sparse_moe.experts", 2, True
    elif name == "tiny-qwen3-moe":  # layer 1 is dense (mlp_only_layers): Qwen3's six kernels
        layers, legacy, top_k, renormalize = [QWEN3_MOE_LAYER, QWEN3_LAYER], "mlp.experts", 3, False
    else:  # Qwen2's five kernels on the dense layer 1
        layers, legacy, top_k, renormalize = [QWEN2_MOE_LAYER, FUSED_LAYER], "mlp.experts", 2, False
    assert [n.op for n in g.nodes] == ["embedding", *layers[0], *layers[1], "logits"]
    moe = layer(g, 0)[-1]
    o, norm = layer(g, 0)[2:4] if name == "tiny-qwen2-moe" else layer(g, 0)[-3:-1]
    if name == "tiny-qwen2-moe":
        down = layer(g, 0)[-2]
        assert moe.input("shared") == down.output("out") and moe.attr("has_shared") is True
        assert layer(g, 0)[4].input("x") == norm.output("out")
        assert moe.input("shared_gate") == "model.layers.0.mlp.shared_expert_gate.weight"
    assert o.attr("has_residual") and norm.input("x") == o.output("out") == moe.input("residual")
    assert moe.input("x") == norm.output("out") and (moe.attr("top_k"), moe.attr("renormalize")) == (top_k, renormalize)
    # The next block (or the final norm) starts from the moe output: the residual stream, no add in between.
    assert layer(g, 1)[0].input("x") == moe.output("out")
    # w13 stacks each expert's gate rows over its up rows, w2 the down matrices, in expert order.
    gate, up, down = ("w1", "w3", "w2") if name == "tiny-mixtral" else ("gate_proj", "up_proj", "down_proj")
    for j in (0, 3):
        e = f"model.layers.0.{legacy}.{j}."
        want13 = torch.cat([src.tensors[e + f"{gate}.weight"], src.tensors[e + f"{up}.weight"]])
        torch.testing.assert_close(w[moe.input("w13")][j], want13, rtol=0, atol=0)
        torch.testing.assert_close(w[moe.input("w2")][j], src.tensors[e + f"{down}.weight"], rtol=0, atol=0)


def test_decode_reads_top_k_of_the_experts():
    """The bandwidth floor's bytes: one token reads its top_k of each sparse layer's E experts (all the rest once)."""
    from artifact_format.graph import Limits
    from compiler.frontends import load_source
    from compiler.trace import trace
    from runtime.bench import decode_weight_bytes

    src = load_source("tiny-mixtral")
    c = src.config
    graph, weights = trace(c, src.tensors, "fp32", Limits(max_seq_len=64, max_batch=4, max_num_tokens=64))
    g, w, _ = optimize(graph, weights, "fp32")
    experts = c["num_hidden_layers"] * c["num_local_experts"] * 3 * c["intermediate_size"] * c["hidden_size"] * 4
    # the input norms fold into the qkv weights; the embedding table is left out (a few rows of it are read)
    rest = sum(t.numel() * 4 for name, t in src.tensors.items()
               if ".experts." not in name and "input_layernorm" not in name and name != "model.embed_tokens.weight")
    # the fp32 rope table is a weight of the graph too
    rest += w["rope.cos_sin"].numel() * 4
    assert decode_weight_bytes(g) == rest + experts * c["num_experts_per_tok"] // c["num_local_experts"]
    # four tokens routed uniformly touch an expert with probability 1 - (1 - 2/8)^4
    assert abs(decode_weight_bytes(g, batch=4) - rest - experts * (1 - 0.75 ** 4)) <= 2


def test_fused_expert_checkpoints_trace_as_per_expert_ones():
    """HF's in-memory layout (mlp.gate, mlp.experts.gate_up_proj [E, 2I, D], down_proj [E, D, I]) is taken as it is
    and gives the very graph and weights the hub's per-expert w1 / w3 / w2 give once stacked."""
    from artifact_format.graph import Limits
    from compiler.frontends import load_source
    from compiler.trace import trace

    src = load_source("tiny-mixtral")
    legacy = dict(src.tensors)
    fused = {k: v for k, v in legacy.items() if "block_sparse_moe" not in k}
    for i in range(src.config["num_hidden_layers"]):
        p, e = f"model.layers.{i}.", range(src.config["num_local_experts"])
        moe = p + "block_sparse_moe."
        fused[p + "mlp.gate.weight"] = legacy[moe + "gate.weight"]
        fused[p + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([legacy[f"{moe}experts.{j}.w1.weight"], legacy[f"{moe}experts.{j}.w3.weight"]]) for j in e])
        fused[p + "mlp.experts.down_proj"] = torch.stack([legacy[f"{moe}experts.{j}.w2.weight"] for j in e])
    limits = Limits(max_seq_len=64, max_batch=4, max_num_tokens=64)
    (g1, w1), (g2, w2) = (trace(src.config, t, "fp32", limits) for t in (legacy, fused))
    renamed = {n.input("router") for n in g2.nodes if n.op == "moe"}
    assert renamed == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
    assert [(n.op, n.attrs) for n in g1.nodes] == [(n.op, n.attrs) for n in g2.nodes]
    for n1, n2 in zip(g1.nodes, g2.nodes):
        for (role, a), (_, b) in zip(n1.inputs, n2.inputs):
            if a in w1:
                assert torch.equal(w1[a], w2[b]), (n1.name, role)
