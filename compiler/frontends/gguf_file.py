"""GGUF files: dequantised tensors under HF names, an HF config from the metadata, the tokenizer from transformers.

llama.cpp stores Llama q/k rows permuted so that its rotary embedding can pair adjacent elements
(GPT-J style); HF Llama pairs element i with i + head_dim/2 (neox style). convert_hf_to_gguf reshapes each
head's rows as (2, head_dim/2) and swaps the two axes; here the rows are viewed as (head_dim/2, 2) and
swapped back. Qwen models use neox pairing in llama.cpp as well, so their rows are stored unpermuted.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from artifact_format.layout import cache_dir, file_sha256
from compiler.frontends import SUPPORTED_ARCHITECTURES, LazyTensors, ModelSource, SourceError
from compiler.frontends.gguf_blocks import NATIVE_TYPES, repack

# GGUF general.architecture → (HF architecture, model_type)
_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
          "qwen3": ("Qwen3ForCausalLM", "qwen3")}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor name; None if it has none."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's q/k permutation; w is [n_head * head_dim, ...] (weight or bias)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf(path: Path, name: str | None = None, progress: bool = False) -> ModelSource:
    """Load a .gguf file: tensors dequantised to fp32 on access, HF config and tokenizer from its metadata."""
    import gguf

    path = Path(path)
    log = _logger(progress)
    log(f"reading {path.name}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors for foreign files
        raise SourceError(f"cannot read {path}: not a GGUF file ({e})") from None
    meta = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
            or k in _TOKEN_IDS}
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(meta, tensors, _vocab_len(reader))
    loaders, stored = {}, {}
    for gname, t in tensors.items():
        if gname == "rope_freqs.weight":
            continue  # folded into config["rope_scaling"]
        hname = hf_name(gname)
        if hname is None:
            raise SourceError(f"{path.name}: tensor {gname} has no place in {config['architectures'][0]}")
        loaders[hname] = _loader(t, hname, config)
        if len(t.shape) == 2:
            stored[hname] = GGUFTensor(t.tensor_type.name, _packed_loader(t, _permuted_heads(hname, config)))
    sha = file_sha256(path)
    tokenizer_json, tokenizer_config = gguf_tokenizer(path, sha, meta, log)
    return ModelSource(name=name or path.stem, config=config, tensors=LazyTensors(dict(sorted(loaders.items()))),
                       tokenizer_json=tokenizer_json, tokenizer_config=tokenizer_config, hf_dir=None,
                       gguf_path=path, sha256=sha, stored=stored)


_TOKEN_IDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
              "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token")


def _value(field):
    v = field.contents()
    return v.item() if isinstance(v, np.generic) else v


def _vocab_len(reader) -> int | None:
    f = reader.fields.get("tokenizer.ggml.tokens")
    return len(f.data) if f is not None else None


def _array(t) -> np.ndarray:
    import gguf

    a = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape.tolist())])
    a = a.astype(np.float32, copy=False)
    return a if a.flags.writeable else a.copy()


def _permuted_heads(hname: str, config: dict) -> int | None:
    """The head count whose q/k row permutation llama.cpp applied to this tensor (unpermute_rows), else None."""
    if config["model_type"] == "llama" and ".self_attn.q_proj." in hname:
        return config["num_attention_heads"]
    if config["model_type"] == "llama" and ".self_attn.k_proj." in hname:
        return config["num_key_value_heads"]
    return None


@dataclass(frozen=True)
class GGUFTensor:
    """A 2-D GGUF tensor as stored: its type name (Q4_1, Q8_0, F32, ...) and, called, its blocks repacked into a
    kernel layout (compiler/frontends/gguf_blocks.py, rows in HF order) or None for a type not served natively."""

    type_name: str
    load: Callable[[], tuple[str, torch.Tensor, torch.Tensor] | None]

    @property
    def native(self) -> bool:
        return self.type_name in NATIVE_TYPES


def _packed_loader(t, n_head: int | None):
    def load():
        if t.tensor_type.name not in NATIVE_TYPES:
            return None
        cols, rows = (int(d) for d in t.shape.tolist())
        scheme, w, scale = repack(t.tensor_type.name, t.data, rows, cols)
        if n_head:  # the same row permutation as the dequantized tensor's: per-row groups move with their rows
            w, scale = unpermute_rows(w, n_head).contiguous(), unpermute_rows(scale, n_head).contiguous()
        return scheme, w, scale

    return load


def _loader(t, hname: str, config: dict):
    n_head = _permuted_heads(hname, config)

    def load() -> torch.Tensor:
        w = torch.from_numpy(_array(t))
        return unpermute_rows(w, n_head).contiguous() if n_head else w

    return load


def _scalar(meta: dict, key: str, default=None):
    v = meta.get(key, default)
    if isinstance(v, list):  # per-layer values; only uniform ones are supported
        if len(set(v)) != 1:
            raise SourceError(f"GGUF {key} varies per layer ({v}); only uniform layers are supported")
        v = v[0]
    return v


def gguf_config(meta: dict, tensors: dict, n_tokens: int | None) -> dict:
    """An HF config.json dict built from GGUF metadata ({arch}.* keys) and the tensor list."""
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise SourceError(f"unsupported architecture {arch} (GGUF general.architecture): supported are "
                          f"{', '.join(_ARCHS)} ({', '.join(SUPPORTED_ARCHITECTURES)})")
    hf_arch, model_type = _ARCHS[arch]

    def key(k, default=None):
        return _scalar(meta, f"{arch}.{k}", default)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    embd = tensors["token_embd.weight"]
    vocab = key("vocab_size") or n_tokens or int(embd.shape[1])
    config = {
        "architectures": [hf_arch], "model_type": model_type, "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")), "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)), "vocab_size": int(vocab),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)), "rope_scaling": _rope_scaling(meta, arch, tensors),
        "tie_word_embeddings": "output.weight" not in tensors, "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensors, "torch_dtype": "float32",
    }
    for k, hk in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                  ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{k}" in meta:
            config[hk] = int(meta[f"tokenizer.ggml.{k}"])
    return config


def _rope_scaling(meta: dict, arch: str, tensors: dict) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in tensors:
        return _llama3_from_freqs(meta, arch, _array(tensors["rope_freqs.weight"]))
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise SourceError(f"unsupported GGUF rope scaling {kind!r}")
    scaling = {"rope_type": kind, "factor": float(factor)}
    if orig:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def _llama3_from_freqs(meta: dict, arch: str, divisors: np.ndarray) -> dict:
    """llama.cpp bakes Llama 3 rope scaling into per-frequency divisors; recover the HF parameters.

    The divisors are 1 for short wavelengths, ``factor`` for long ones and a smooth blend between. With
    Meta's low/high factors (1, 4) a blended divisor fixes the original context; without one, it is taken
    from the metadata or Meta's 8192. Every candidate is checked against all divisors.
    """
    base = float(_scalar(meta, f"{arch}.rope.freq_base", 10000.0))
    dim = 2 * divisors.shape[0]
    factor = float(divisors.max())
    wavelen = 2 * math.pi * base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    blended = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    smooth = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
    candidates = [meta.get(f"{arch}.rope.scaling.original_context_length"), 8192,
                  *np.round(wavelen[blended] * (1 + 3 * smooth)).tolist()]
    for orig in candidates:
        if not orig:
            continue
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": int(orig)}
        if factor > 1 and np.allclose(divisors, llama3_divisors(base, dim, scaling), rtol=1e-4):
            return scaling
    raise SourceError("unsupported GGUF rope_freqs: not Llama 3 rope scaling with low/high frequency factors 1 and 4")


def llama3_divisors(base: float, dim: int, s: dict) -> np.ndarray:
    """What each rotary frequency is divided by under Llama 3 scaling (the values of GGUF rope_freqs)."""
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    orig = s["original_max_position_embeddings"]
    smooth = (orig / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blend = 1.0 / ((1 - smooth) / s["factor"] + smooth)
    out = np.where(wavelen < orig / s["high_freq_factor"], 1.0, blend)
    return np.where(wavelen > orig / s["low_freq_factor"], s["factor"], out).astype(np.float32)


def gguf_tokenizer(path: Path, sha: str, meta: dict, log) -> tuple[bytes, dict]:
    """tokenizer.json and tokenizer_config from transformers' GGUF conversion, cached by file hash."""
    import transformers

    cache = cache_dir() / "gguf-tokenizers" / f"{sha}-transformers-{transformers.__version__}"
    if (cache / "tokenizer.json").is_file() and (cache / "tokenizer_config.json").is_file():
        return (cache / "tokenizer.json").read_bytes(), json.loads((cache / "tokenizer_config.json").read_text())
    log("converting the GGUF tokenizer (transformers)")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise SourceError(f"cannot build a tokenizer from {path.name}: {e}") from None
    tokenizer_json = tok.backend_tokenizer.to_str().encode()
    arch = meta["general.architecture"]
    tc = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
          "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
          "bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token,
          "pad_token": tok.pad_token, "chat_template": tok.chat_template or meta.get("tokenizer.chat_template"),
          "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast",
          "model_max_length": int(_scalar(meta, f"{arch}.context_length", 2048))}
    _write_atomic(cache, {"tokenizer.json": tokenizer_json,
                          "tokenizer_config.json": (json.dumps(tc, indent=2, sort_keys=True) + "\n").encode()})
    return tokenizer_json, tc


def _write_atomic(dest: Path, files: dict[str, bytes]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    for fname, data in files.items():
        (tmp / fname).write_bytes(data)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)


def _logger(progress: bool):
    if not progress:
        return lambda msg: None
    from rich.console import Console

    return Console(stderr=True).print
