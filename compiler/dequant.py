"""The checkpoint a quantized artifact computes with: its int8 / int4 / repacked GGUF weights dequantized and mapped
back to the source's tensor names, so HF transformers can run exactly the model the artifact runs (the reference of
`runtime verify`).

Each quantized weight is walked back through the transform records that made it (docs/artifact.md, manifest
`model.transforms`), newest first: the rope row pairing and the GLU interleave are permutations (inverted), and a
merge is a concat along rows (split again). No norm weight is folded into a quantized weight (the kernels apply it to
x, fold_norms in_kernel), so transformers' norms, on the source's own norm weights, are the artifact's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from kernels.rope_epilogue import RopeEpilogue
from kernels.weight_quant import dequantize

QUANTIZE_OPS = ("quantize_int8", "quantize_int4", "repack_gguf")


def dequantized_checkpoint(transforms: list[dict], weights: Mapping[str, torch.Tensor],
                           rows: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Source tensor name -> the fp32 weight the artifact computes with, for every weight quantize_weights replaced.

    weights: the artifact's weights; rows: source tensor name -> its number of rows (to split merges)."""
    made = {r["output"]: r for r in transforms if "output" in r and r["op"] not in ("cast", *QUANTIZE_OPS)}
    out: dict[str, torch.Tensor] = {}
    for r in transforms:
        if r["op"] in QUANTIZE_OPS:  # kernels/weight_quant.py tells the schemes apart by dtype and rank
            value = _dequantize(weights[r["output"]], weights[r["scale"]])
            out.update(_unwind(r["inputs"][0], value, made, rows))
    return out


def _dequantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] of a matmul weight, or [E, N, K] of an expert stack (quantized as its E * N rows)."""
    if w.dim() == 2:
        return dequantize(w, scale)
    return dequantize(w.flatten(0, 1), scale.flatten(0, 1)).reshape(w.shape[0], w.shape[1], -1)


def _unwind(name: str, value: torch.Tensor, made: dict[str, dict], rows: Mapping[str, int]
            ) -> Iterator[tuple[str, torch.Tensor]]:
    record = made.get(name)
    if record is None:  # a source tensor
        yield name, value
        return
    op, src = record["op"], record["inputs"]
    if op == "pair_rotary_rows":
        order = RopeEpilogue.from_attrs(record).row_order()
        before = torch.empty_like(value)
        before[order] = value
        yield from _unwind(src[0], before, made, rows)
    elif op == "interleave_rows":
        yield from _unwind(src[0], torch.cat([value[0::2], value[1::2]]), made, rows)
    elif op == "concat":
        for part, piece in zip(src, value.split([rows[p] for p in src])):
            yield from _unwind(part, piece, made, rows)
    else:
        raise ValueError(f"cannot undo the transform {op!r} of {name} to build a dequantized reference: compile "
                         f"with --no-reference")
