import math

import pytest
import torch

from artifact_format.graph import STEP_INPUTS, Limits
from compiler import ops
from compiler.ops import BASIC_OPS, Tracer
from compiler.trace import rope_table, trace
from tests.compiler.graph_eval import (
    LIMITS,
    LLAMA3,
    MODELS,
    PHI3_LONGROPE,
    SEQS,
    evaluate,
    hf_logits,
    prefill_feeds,
    tiny_model,
    traced,
)

LAYER = ["rms_norm", "linear", "linear", "linear", "concat", "rope", "kv_cache_write", "attention", "linear", "add",
         "rms_norm", "linear", "linear", "silu", "mul", "linear"]


def layer_ops(graph, i):
    return [n.op for n in graph.nodes if n.name.startswith(f"layers.{i}.")]


def test_llama_trace_is_the_plain_maths():
    graph, _, _, _, _ = traced("llama")
    assert graph.nodes[0].op == "embedding"
    assert layer_ops(graph, 0) == LAYER  # layer 0's residual stream is the embedding: no add before its norm
    assert layer_ops(graph, 1) == ["add", *LAYER]
    assert [n.op for n in graph.nodes[-4:]] == ["add", "rms_norm", "gather", "linear"]
    assert len(graph.nodes) == 1 + 16 + 17 + 4
    assert {n.op for n in graph.nodes} <= set(BASIC_OPS) | {"embedding", "rms_norm", "linear", "rope",
                                                            "kv_cache_write", "attention"}
    qkv = next(n for n in graph.nodes if n.op == "concat")
    assert [name for _, name in qkv.inputs] == [f"layers.0.self_attn.{p}_proj" for p in "qkv"]


def test_families_differ_where_the_architectures_do():
    qwen2, _, _, _, _ = traced("qwen2")
    qkv_linears = [n for n in qwen2.nodes if n.name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj")]
    assert len(qkv_linears) == 6 and all(n.attr("has_bias") and n.input("bias") for n in qkv_linears)
    assert not any(n.attr("has_bias") for n in qwen2.nodes if n.op == "linear" and "o_proj" in n.name)
    qwen3, _, _, _, _ = traced("qwen3")
    assert layer_ops(qwen3, 0) == LAYER[:5] + ["qk_norm"] + LAYER[5:]
    norm = next(n for n in qwen3.nodes if n.op == "qk_norm")
    assert norm.input("q_norm") == "model.layers.0.self_attn.q_norm.weight"
    assert qwen3.get_meta("head_dim") == 20 and qwen3.tensor("k_cache.0").shape == ("NB", 4, 2, 20)


def test_inputs_caches_outputs_and_meta():
    graph, weights, config, _, _ = traced("llama", "bf16")
    shapes = {"ids": ("T",), "positions": ("T",), "slot_mapping": ("T",), "cu_seqlens_q": ("S+1",),
              "seq_lens": ("S",), "block_tables": ("S", LIMITS.max_blocks), "last_idx": ("R",)}
    assert [t.name for t in graph.by_kind("input")] == list(STEP_INPUTS)
    assert all(graph.tensor(n).shape == s and graph.tensor(n).dtype == "i32" for n, s in shapes.items())
    sources = graph.sources("cache")
    assert [t.name for t in sources] == ["k_cache.0", "v_cache.0", "k_cache.1", "v_cache.1"]
    assert all(t.shape == ("NB", 4, 2, 12) and t.dtype == "bf16" for t in sources)
    # The caches kv_cache_write returns are new SSA names for the same storage.
    write = next(n for n in graph.nodes if n.op == "kv_cache_write")
    written = write.output("v_cache")
    assert graph.tensor(written).kind == "cache" and graph.storage(written) == "v_cache.0"
    rope = next(n for n in graph.nodes if n.op == "rope")
    assert graph.storage(rope.output("qkv")) == "layers.0.qkv" and graph.storage("layers.0.qkv") == "layers.0.qkv"
    logits = graph.tensor("logits")
    assert graph.outputs == ("logits",) and logits.kind == "output"
    assert logits.shape == ("R", 97) and logits.dtype == "fp32"
    assert dict(graph.meta) == {
        "family": "llama", "architecture": "LlamaForCausalLM", "num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2,
        "head_dim": 12, "hidden_size": 48, "intermediate_size": 80, "vocab_size": 97, "block_size": 4,
        "max_blocks": 8, "max_seq_len": 32, "rotary_dim": 12, "dtype": "bf16", "eps": 1e-5,
        "tie_word_embeddings": False}
    # Weights keep their checkpoint names and dtype (fp32 here); the graph declares the build dtype.
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert set(weights) == {t.name for t in graph.by_kind("weight")}
    assert graph.tensor("model.layers.0.mlp.up_proj.weight").dtype == "bf16"
    assert graph.tensor("rope.cos_sin").dtype == "fp32"


def test_tied_embedding_is_one_tensor():
    graph, weights, _, tensors, _ = traced("llama3-tied")
    assert "lm_head.weight" in tensors and "lm_head.weight" not in weights
    assert graph.nodes[-1].input("w") == graph.nodes[0].input("weight") == "model.embed_tokens.weight"


def test_phi3_uses_its_fused_matrices_as_they_are():
    graph, weights, _, _, _ = traced("phi3")
    assert layer_ops(graph, 0) == ["rms_norm", "linear", "rope", "kv_cache_write", "attention", "linear", "add",
                                   "rms_norm", "linear", "silu_mul", "linear"]
    linears = [n.input("w") for n in graph.nodes if n.op == "linear" and n.name.startswith("layers.0.")]
    assert linears == [f"model.layers.0.{p}.weight" for p in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                               "mlp.gate_up_proj", "mlp.down_proj")]
    assert graph.get_meta("rotary_dim") == 6 and graph.get_meta("head_dim") == 12  # partial rotary 0.5


@pytest.mark.parametrize("name", ["llama", "llama3-tied", "llama-linear", "qwen3", "phi3"])
def test_cos_sin_matches_hf_rotary_embedding(name):
    graph, weights, config, _, model = traced(name)
    positions = torch.arange(LIMITS.max_seq_len)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    half = graph.get_meta("rotary_dim") // 2
    # HF repeats the half-width table twice (neox halves); trilite stores each half once.
    torch.testing.assert_close(weights["rope.cos_sin"], torch.cat([cos[0, :, :half], sin[0, :, :half]], 1),
                               rtol=0, atol=0)


def test_rope_scaling_changes_the_table():
    config, _, _ = tiny_model("llama")
    plain = rope_table(config, 12, 32)
    scaled = rope_table({**config, "rope_scaling": LLAMA3}, 12, 32)
    linear = rope_table({**config, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, 12, 32)
    assert plain.shape == (32, 12) and not torch.allclose(plain, scaled) and not torch.allclose(plain, linear)
    # Linear scaling divides every frequency: position 4p scaled equals position p plain.
    torch.testing.assert_close(linear[4::4][:7], plain[1:8], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_seq_len", [24, 32, 33, 64])
@pytest.mark.parametrize("kind", ["longrope", "su"])
def test_longrope_table_is_hfs_for_the_longest_sequence(kind, max_seq_len):
    """Short factors while no sequence can pass original_max_position_embeddings (32), long ones once it can.

    HF's Phi3RotaryEmbedding is run over positions 0..max_seq_len-1: its dynamic update takes the long factors
    exactly when the last position passes the original length, and it scales cos and sin by the attention factor.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config, _, model = tiny_model("phi3", **MODELS["phi3"][1])
    # transformers 5 itself only reads "su" with the original length inside rope_scaling; trilite's own reading
    # of the Phi-3 form (original length at the top) must give the same table.
    table = rope_table({**config, "rope_parameters": None, "rope_scaling": dict(PHI3_LONGROPE, type=kind)}, 12,
                       max_seq_len)
    cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(max_seq_len)[None])
    torch.testing.assert_close(table, torch.cat([cos[0, :, :3], sin[0, :, :3]], 1), rtol=0, atol=0)
    factors = PHI3_LONGROPE["long_factor" if max_seq_len > 32 else "short_factor"]
    inv_freq = 1.0 / (torch.tensor(factors) * 10000.0 ** (torch.arange(0, 6, 2).float() / 6))
    scale = math.sqrt(1 + math.log(64 / 32) / math.log(32))  # factor = max_position_embeddings / original
    torch.testing.assert_close(table[5, :3], (5 * inv_freq).cos() * scale)
    hf_inv_freq, hf_scale = ROPE_INIT_FUNCTIONS["longrope"](model.config, "cpu", seq_len=max_seq_len)
    torch.testing.assert_close(hf_inv_freq, inv_freq)
    assert math.isclose(hf_scale, scale)


def test_longrope_attention_factor_from_the_config_wins():
    config, _, _ = tiny_model("phi3", **MODELS["phi3"][1])
    plain, scaled = (rope_table({**config, "rope_parameters": None,
                                 "rope_scaling": dict(PHI3_LONGROPE, attention_factor=f)}, 12, 32) for f in (1.0, 1.5))
    torch.testing.assert_close(scaled, plain * 1.5)


@pytest.mark.parametrize("name", list(MODELS))
def test_unfused_trace_matches_hf(name):
    graph, weights, _, _, model = traced(name)
    logits = evaluate(graph, weights, prefill_feeds(graph, LIMITS, SEQS))["logits"]
    ref = torch.stack([hf_logits(model, s)[-1] for s in SEQS])
    assert logits.shape == ref.shape
    assert ((logits - ref).norm() / ref.norm()).item() <= 1e-4


def test_every_row_logits_match_hf():
    graph, weights, _, _, model = traced("qwen2")
    logits = evaluate(graph, weights, prefill_feeds(graph, LIMITS, SEQS, all_rows=True))["logits"]
    ref = torch.cat([hf_logits(model, s) for s in SEQS])
    assert logits.shape == (sum(map(len, SEQS)), 97)
    assert ((logits - ref).norm() / ref.norm()).item() <= 1e-4


def test_unsupported_models_say_what_is_supported():
    config, tensors, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        trace({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, tensors, "fp32", LIMITS)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        trace({**config, "hidden_act": "gelu"}, tensors, "fp32", LIMITS)
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        trace({**config, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, tensors, "fp32", LIMITS)
    with pytest.raises(ValueError, match="unknown dtype"):
        trace(config, tensors, "fp8", LIMITS)
    missing = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match="no tensor model.layers.1.mlp.up_proj.weight"):
        trace(config, missing, "fp32", LIMITS)
    qwen2_config, qwen2_tensors, _ = tiny_model("qwen2")
    no_bias = {k: v for k, v in qwen2_tensors.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match="k_proj.bias"):
        trace(qwen2_config, no_bias, "fp32", LIMITS)


def test_ops_check_shapes():
    t = Tracer("fp32")
    x = t.source("x", "fp32", ("T", 8), "input")
    with pytest.raises(ValueError, match="does not take"):
        ops.linear(x, t.weight("w.weight", torch.zeros(4, 6)))
    with pytest.raises(ValueError, match="wide"):
        ops.rope(x, t.source("positions", "i32", ("T",), "input"), t.weight("cs", torch.zeros(8, 2), "fp32"),
                 num_q_heads=2, num_kv_heads=1, head_dim=4, eps=1e-6)
    with pytest.raises(ValueError, match="differ"):
        ops.add(x, t.source("y", "fp32", ("T", 4), "input"))
    with pytest.raises(ValueError, match="no even width"):
        ops.silu_mul(t.source("gu", "fp32", ("T", 7), "input"))
    assert ops.silu_mul(x).shape == ("T", 4)


def test_in_place_input_read_elsewhere_is_refused():
    t = Tracer("fp32")
    qkv = t.source("qkv", "fp32", ("T", 16), "input")
    qkv2 = ops.add(qkv, qkv)
    heads = {"num_q_heads": 2, "num_kv_heads": 1, "head_dim": 4, "eps": 1e-6}
    rotated = ops.rope(qkv2, t.source("positions", "i32", ("T",), "input"), t.weight("cs", torch.zeros(8, 4), "fp32"),
                       **heads)
    out = ops.add(rotated, qkv2, name="out")  # reads qkv2 after rope overwrote it
    with pytest.raises(ValueError, match="overwrites add in place"):
        t.graph({"out": out}, {})


@pytest.mark.parametrize("kwargs,match", [
    ({"max_seq_len": 0, "max_batch": 1, "max_num_tokens": 1}, "max_seq_len"),
    ({"max_seq_len": 8, "max_batch": 4, "max_num_tokens": 2}, "at least max_batch"),
    ({"max_seq_len": 8, "max_batch": 1, "max_num_tokens": 8, "block_size": 12}, "power of two"),
    ({"max_seq_len": 8.0, "max_batch": 1, "max_num_tokens": 8}, "positive integer"),
])
def test_limits_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Limits(**kwargs)
    assert Limits(max_seq_len=33, max_batch=1, max_num_tokens=8, block_size=16).max_blocks == 3


def _windows(graph) -> list[int]:
    return [dict(n.attrs).get("window", 0) for n in graph.nodes if n.op == "attention"]


def test_sliding_window_is_a_per_layer_attention_attr():
    graph, weights, config, tensors, model = traced("mistral-swa")
    assert _windows(graph) == [5, 5]  # Mistral: every layer slides
    # A window no shorter than max_seq_len is causal attention: no attr, the windowless graph.
    full, _ = trace({**config, "sliding_window": LIMITS.max_seq_len}, tensors, "fp32", LIMITS)
    assert _windows(full) == [0, 0] and all("window" not in dict(n.attrs) for n in full.nodes)
    # The window changes the logits of a prompt longer than it (and HF agrees: test_unfused_trace_matches_hf).
    feeds = prefill_feeds(graph, LIMITS, SEQS)
    windowed = evaluate(graph, weights, feeds)["logits"]
    plain = evaluate(full, weights, prefill_feeds(full, LIMITS, SEQS))["logits"]
    assert not torch.allclose(windowed, plain, rtol=1e-3, atol=1e-3)
    # Qwen2 slides only from max_window_layers on, as transformers' layer_types say.
    qwen2_config, qwen2_tensors, _ = tiny_model("qwen2")
    qwen2 = {**qwen2_config, "use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}
    qwen2.pop("layer_types", None)
    assert _windows(trace(qwen2, qwen2_tensors, "fp32", LIMITS)[0]) == [0, 7]
