"""Reference logits from HF transformers, loading the same files the compiler read (HF directory or GGUF).

transformers dequantises and un-permutes a GGUF on its own, so for GGUF sources this reference is
independent of trilite's frontend as well as of its kernels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compiler.frontends import ModelSource


def checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """The widest float dtype among the tensors of some safetensors files (read from their headers only)."""
    from safetensors import safe_open

    names = set()
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names |= {h.get_slice(k).get_dtype() for k in h.keys()}
    for name, dtype in (("F64", torch.float64), ("F32", torch.float32), ("BF16", torch.bfloat16),
                        ("F16", torch.float16)):
        if name in names:
            return dtype
    return torch.float32


def load_reference_model(source: ModelSource, device: str | torch.device = "cpu"):
    """The HF transformers model for ``source`` in fp32, eval mode, on ``device``.

    An HF directory loads in its checkpoint's own dtype and becomes fp32 afterwards, on ``device``: the same
    values as loading in fp32 (widening is exact), but transformers then maps the files instead of converting
    every tensor on the CPU, which took minutes for 8B parameters. Raises ValueError when transformers would
    leave any weight at its random init (a name mismatch).
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "attn_implementation": "eager", "output_loading_info": True}
    if source.hf_dir is not None:
        kwargs["dtype"] = checkpoint_dtype(sorted(Path(source.hf_dir).glob("*.safetensors")))
        model, info = AutoModelForCausalLM.from_pretrained(str(source.hf_dir), use_safetensors=True, **kwargs)
    elif source.gguf_path is not None:
        model, info = AutoModelForCausalLM.from_pretrained(str(source.gguf_path.parent),
                                                           gguf_file=source.gguf_path.name, **kwargs)
    elif source.hf_names:  # a random preset compiled straight from its generator
        model, info = _from_tensors(source, device)
    else:
        raise ValueError(f"{source.name}: no HF directory or GGUF file for transformers to load")
    tied = model.config.tie_word_embeddings
    missing = [k for k in info.get("missing_keys", ()) if not (k == "lm_head.weight" and tied)]
    unexpected = list(info.get("unexpected_keys", ()))
    if missing or unexpected:
        raise ValueError(f"{source.name}: transformers did not load every weight (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model = model.to(device)
    return (model if kwargs["dtype"] == torch.float32 else model.float()).eval()


def _from_tensors(source: ModelSource, device: str | torch.device):
    """transformers' model for ``source.config`` in fp32 on ``device``, its parameters (HF names) copied from
    ``source.tensors`` one by one (no random init first). Needs the fp32 model's memory on the device: a full-size
    preset compiled straight from its generator is built with --no-reference."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = dict(source.config)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    params = dict(model.named_parameters())
    missing = [name for name in params if name not in source.tensors]
    unexpected = [name for name in source.tensors if name not in params]
    with torch.no_grad():
        for name in source.tensors:
            if name in params:
                params[name].copy_(source.tensors[name])
    return model, {"missing_keys": missing, "unexpected_keys": unexpected}


def override_weights(model, overrides: dict[str, torch.Tensor], name: str) -> None:
    """Replace some of ``model``'s parameters by name (a quantized artifact's dequantized weights), shapes checked."""
    params = dict(model.named_parameters())
    for key, value in overrides.items():
        if key not in params or params[key].shape != value.shape:
            raise ValueError(f"{name}: transformers' model has no parameter {key} of shape {tuple(value.shape)} for "
                             f"the dequantized reference: compile with --no-reference")
        params[key].data.copy_(value)


@torch.no_grad()
def reference_logits(source: ModelSource, prompt_ids: list[int], overrides: dict[str, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """fp32 logits [len(prompt_ids), vocab] for every prompt position, on the CPU; with ``overrides`` (parameter
    name -> value) those parameters replaced first.

    Runs on a CUDA/HIP GPU when one is present (fp32 matmuls without TF32), else on the CPU.
    """
    if not prompt_ids:
        raise ValueError("reference_logits needs at least one prompt token")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_reference_model(source, device)
    if overrides:
        override_weights(model, overrides, source.name)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        logits = model(input_ids=ids, use_cache=False).logits[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return logits.float().cpu()
