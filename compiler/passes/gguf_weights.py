"""--quant gguf: each matmul weight, embedding table and lm_head keeps its GGUF tensors' own quantized values.

The weights the passes carry are the GGUF's dequantized values (the frontend's), merged, interleaved and paired by the
passes before this one. A GGUF type is a per-row layout (groups along K), so every one of those row operations
commutes with it: this pass replays them, recorded in the transforms (concat, interleave_rows, pair_rotary_rows), on
the repacked blocks of the source tensors (compiler/frontends/gguf_blocks.py) instead of on their values. Parts of a
merge with different layouts (a Q4_K_M file's Q4_K q and k beside a Q6_K v) meet in the one that holds both exactly:
int4 q are int8_group q in [0, 15], and a group's pair holds for each of its halves. The result is checked value for
value against the weight the passes carried, so a repack can never be silently wrong.

A weight with a part of a type the kernels do not read (F16, F32, Q2_K, IQ*, ...) keeps the dequantized values in
the build dtype, as --quant none would, and a record says so (build prints it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from artifact_format.graph import QUANT_ROLES, Graph, TensorSpec
from compiler.passes.rewrite import Edit, make_node
from compiler.passes.weights import QUANTIZED_OPS, Weights, interleave_pairs
from kernels.rope_epilogue import RopeEpilogue
from kernels.weight_quant import dequantize, scheme_of, unpack_int4

Packed = tuple[str, torch.Tensor, torch.Tensor]  # (scheme, w, scale)
_GRAPH_DTYPES = {"int4": "u8", "int8_group": "i8"}


def repack_gguf(g: Graph, weights: Mapping[str, torch.Tensor], stored: Mapping, records: list[dict]
                ) -> tuple[Graph, Weights, list[dict]]:
    """The quantizable nodes' weights -> their GGUF blocks repacked (attrs quant int4 or int8_group, group_size;
    input scale / weight_scale), where every source tensor behind the weight is of a native type.

    stored: HF name -> GGUFTensor (the frontend's); records: the transform records of the passes so far. A table tied
    to the lm_head is repacked once. ValueError if a repacked weight differs from the value the passes carried."""
    made = {r["output"]: r for r in records if "output" in r and r["op"] != "cast"}
    e, out, new_records = Edit(g), dict(weights), []
    done: dict[str, tuple[str, str, str, int] | None] = {}
    for node in g.nodes:
        if node.op not in QUANTIZED_OPS or node.attr("quant"):
            continue
        w_role, s_role = QUANT_ROLES[node.op]
        src = node.input(w_role)
        if src not in done:
            types: dict[str, str] = {}
            packed = _build(src, made, stored, types)
            if packed is None:
                done[src] = None
                new_records.append({"op": "gguf_dequantized", "inputs": [src], "gguf_types": types})
                continue
            scheme, w, scale = packed
            if not torch.equal(dequantize(w, scale), weights[src].float()):
                raise ValueError(f"--quant gguf: the repacked blocks of {src} do not reproduce its dequantized "
                                 f"values (a bug): compile with --quant none")
            base = src.removesuffix(".weight")
            q_name, s_name = e.fresh(f"{base}.gguf.weight"), e.fresh(f"{base}.gguf.scale")
            out[q_name], out[s_name] = w, scale
            e.add_spec(TensorSpec(q_name, _GRAPH_DTYPES[scheme], tuple(w.shape), "weight"))
            e.add_spec(TensorSpec(s_name, "fp32", tuple(scale.shape), "weight"))
            group = scheme_of(w, scale)[1]
            new_records.append({"op": "repack_gguf", "inputs": [src], "output": q_name, "scale": s_name,
                                "scheme": scheme, "group_size": group, "gguf_types": types,
                                "scale_layout": "[N, K / group_size, 2] (scale, min)"})
            done[src] = (q_name, s_name, scheme, group)
        if done[src] is None:
            continue
        q_name, s_name, scheme, group = done[src]
        inputs = {**dict(node.inputs), w_role: q_name, s_role: s_name}
        extra = {"out_dtype": g.get_meta("dtype")} if node.op == "embedding" else {}
        e.replace([node], make_node(node.op, node.name, inputs, dict(node.outputs),
                                    **{**dict(node.attrs), "quant": scheme, "group_size": group, **extra}), at=node)
    g2 = e.graph()
    return g2, {t.name: out[t.name] for t in g2.by_kind("weight")}, new_records


def _build(name: str, made: dict[str, dict], stored: Mapping, types: dict[str, str]) -> Packed | None:
    """The packed form of weight ``name``: a source tensor's repacked blocks, or the record that made it replayed on
    its inputs' packed forms. None when some source is not native (its type noted in ``types``) or a transform is not
    a row operation."""
    if name in stored:
        types[name] = stored[name].type_name
        return stored[name].load()
    record = made.get(name)
    if record is None:
        return None
    parts = [_build(src, made, stored, types) for src in record["inputs"]]
    if any(p is None for p in parts):
        return None
    op = record["op"]
    if op == "concat":
        return _concat(parts)
    (scheme, w, scale), = parts
    if op == "interleave_rows":
        return scheme, interleave_pairs(w), interleave_pairs(scale)
    if op == "pair_rotary_rows":
        order = RopeEpilogue.from_attrs(record).row_order()
        return scheme, w[order].contiguous(), scale[order].contiguous()
    return None


def _concat(parts: list[Packed]) -> Packed:
    """Row concat of packed weights over one K; mixed layouts go to int8_group at the smallest group size."""
    layouts = {scheme_of(w, s) for _, w, s in parts}
    if len(layouts) == 1:
        return parts[0][0], torch.cat([w for _, w, _ in parts]), torch.cat([s for _, _, s in parts])
    group = min(gs for _, gs in layouts)
    ws, ss = [], []
    for scheme, w, s in parts:
        ws.append(unpack_int4(w).to(torch.int8) if scheme == "int4" else w)
        ss.append(s.repeat_interleave(scheme_of(w, s)[1] // group, dim=1))
    return "int8_group", torch.cat(ws), torch.cat(ss)
