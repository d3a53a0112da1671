"""Model frontends: a preset name, an HF directory or a .gguf file → one ``ModelSource``.

Every frontend hands the rest of the compiler the same thing: the HF config, HF-named CPU tensors,
the tokenizer and, where there is one, a path that HF transformers can load for reference logits.
Submodules are imported lazily so that importing this package pulls in neither transformers nor gguf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# Configs written without `architectures` still name their model_type.
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                "gemma2": "gemma2", "gemma3_text": "gemma3", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe",
                "qwen3_moe": "qwen3_moe"}


class SourceError(ValueError):
    """A model source that cannot be loaded; the message is one line that says what to do."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    config: dict
    tensors: Mapping[str, torch.Tensor]
    tokenizer_json: bytes
    tokenizer_config: dict
    hf_dir: Path | None
    gguf_path: Path | None
    sha256: str
    # GGUF only: HF name -> its tensor as stored (compiler/frontends/gguf_file.py, GGUFTensor): the type and, for a
    # type the kernels read natively, its blocks repacked (--quant gguf keeps those instead of `tensors`' values).
    stored: Mapping[str, object] | None = None
    # The tensors carry transformers' own parameter names, so they can be its state dict (a random preset compiled
    # straight from its generator, compiler/frontends/random_direct.py): the reference without files.
    hf_names: bool = False


class LazyTensors(Mapping):
    """A read-only name → tensor mapping that reads each tensor from its file when asked.

    Big models never sit in memory twice: the compiler walks the weights one by one. Each lookup reads
    (and for GGUF dequantises) again, so callers that need a tensor twice should keep it.
    """

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]):
        self._loaders = loaders

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __contains__(self, name: object) -> bool:
        return name in self._loaders

    def __repr__(self) -> str:
        return f"LazyTensors({len(self)} tensors)"


def family_of(config: dict) -> str:
    """The model-definition family ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen2_moe",
    "qwen3_moe") for an HF config;
    ValueError if unsupported."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    arch = archs[0] if archs else "(none)"
    raise ValueError(f"unsupported architecture {arch} (model_type {model_type}): supported are "
                     + ", ".join(SUPPORTED_ARCHITECTURES))


# Sizes every model definition reads from config.json; a missing or non-positive one would surface as a KeyError
# or a shape error deep in tracing.
REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_config(config: dict, source: str) -> None:
    """SourceError naming the first size the definitions need that config.json lacks or gets wrong."""
    for key in REQUIRED_SIZES:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            what = "lacks" if key not in config else f"has an invalid ({value!r})"
            raise SourceError(f"the config of {source} {what} {key}: it must be a positive integer; fix config.json "
                              f"or use the model's original files")
    for key in ("num_key_value_heads", "head_dim"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SourceError(f"the config of {source} has an invalid {key} ({value!r}): it must be a positive "
                              f"integer; fix config.json or use the model's original files")
    if config["hidden_size"] % config["num_attention_heads"] and not config.get("head_dim"):
        raise SourceError(f"the config of {source}: hidden_size {config['hidden_size']} is not a multiple of "
                          f"num_attention_heads {config['num_attention_heads']} and no head_dim is given")


def list_presets() -> dict[str, str]:
    """Preset name → one-line description."""
    from compiler.frontends.presets import PRESETS

    return {name: p.description for name, p in PRESETS.items()}


def load_source(source: str, progress: bool = False) -> ModelSource:
    """Load a preset name, an HF model directory or a .gguf file; SourceError (a ValueError) if it can't."""
    from compiler.frontends import gguf_file, hf, presets

    if source in presets.PRESETS:
        src = presets.load_preset(source, progress=progress)
    else:
        path = Path(source).expanduser()
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as e:
            raise SourceError(f"cannot read {source}: {e.strerror or e}") from None
        if is_dir:
            src = hf.load_hf_dir(path, progress=progress)
        elif is_file and path.suffix.lower() == ".gguf":
            src = gguf_file.load_gguf(path, progress=progress)
        elif is_file:
            raise SourceError(f"{source} is not a .gguf file; give a preset name (trilite compiler models), "
                              "an HF model directory or a .gguf file")
        else:
            raise SourceError(f"no such model: {source} — give a preset name (trilite compiler models), "
                              "an HF model directory or a .gguf file" + presets.suggest(source))
    family_of(src.config)
    check_config(src.config, source)
    return src
