"""The artifact's files other than the kernels: weights, graph, tokenizer, tuning, manifest fields, reference."""

from __future__ import annotations

from pathlib import Path

import torch
import triton

from artifact_format.graph import Graph, Limits
from artifact_format.layout import dump_json
from compiler.aot import Target

REFERENCE_TEXT = "The capital of France is"


def write_files(stage: Path, src, graph: Graph, weights: dict, tuning: dict) -> dict[str, str]:
    """Write the artifact's files but the manifest; returns {relative path: sha256} of those hashed on the way."""
    import json

    from artifact_format.onnx_io import to_onnx
    from compiler.fileio import save_tensors

    sha = save_tensors(stage / "weights.safetensors", dict(sorted(weights.items())))
    (stage / "graph.onnx").write_bytes(to_onnx(graph).SerializeToString(deterministic=True))
    (stage / "tokenizer.json").write_bytes(src.tokenizer_json)
    (stage / "tokenizer_config.json").write_bytes(dump_json(src.tokenizer_config))
    (stage / "tuning.json").write_bytes(dump_json(json.loads(json.dumps(tuning))))
    return {"weights.safetensors": sha}


def manifest_fields(source: str, src, family: str, dtype: str, targets: list[Target], limits: Limits, mem: dict,
                    transforms: list[dict], quant: str = "none", group_size: int | None = None) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "unknown"

    buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < limits.max_batch] + [limits.max_batch]
    return {
        "name": src.name,
        "model": {"architecture": src.config.get("architectures", ["?"])[0], "family": family, "config": src.config,
                  "dtype": dtype, "quant": quant,
                  **({"quant_group_size": group_size} if quant == "int4" else {}),
                  # Quantized weights keep the norm weight out (fold_norms in_kernel): rms_norm_linear applies it.
                  **({"norm_weights": "applied to x in rms_norm_linear (attr use_norm_w, input norm_w)"}
                     if quant != "none" else {}),
                  "source": source if not Path(source).exists() else Path(source).name,
                  "source_sha256": src.sha256, "transforms": transforms},
        "build": {"trilite": version("trilite"), "triton": triton.__version__,
                  "torch": torch.__version__.split("+")[0]},
        "targets": [str(t) for t in targets],
        "limits": {"max_seq_len": limits.max_seq_len, "max_batch": limits.max_batch,
                   "max_num_tokens": limits.max_num_tokens, "block_size": limits.block_size,
                   "decode_buckets": buckets},
        "memory_plan": mem,
    }


def write_reference(stage: Path, src, overrides: dict | None = None) -> dict:
    """reference.safetensors from transformers on the source; with ``overrides`` (a quantized build: source tensor
    name -> the dequantized weight the artifact computes with) on those weights instead of the source's."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from compiler.reference import reference_logits

    ids = Tokenizer.from_str(src.tokenizer_json.decode()).encode(REFERENCE_TEXT).ids
    logits = reference_logits(src, ids, overrides).float().contiguous()
    save_file({"logits": logits}, str(stage / "reference.safetensors"))
    return {"prompt_ids": ids, "text": REFERENCE_TEXT, "dtype": "fp32",
            "source": "transformers" if overrides is None else "transformers on the dequantized weights"}
