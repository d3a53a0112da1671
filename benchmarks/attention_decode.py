"""Decode attention of both benchmark presets, every candidate config, on the GPU.

    PYTHONPATH=. python benchmarks/attention_decode.py [--context 384] [--batch 1,16,32] [--pdl] [--out FILE]

For each preset's heads (TinyLlama-1.1B: 32 q / 4 kv heads of 64; Llama-3-8B: 32 / 8 of 128) and batch, every
candidate config of attention_decode (split counts and key tiles; more than one split adds the combine launch) is first
checked against the op's reference on fresh random inputs with its output poisoned (NaN), then timed: a CUDA graph
of LAYERS back-to-back launches (one per layer, as in a decode step; --pdl launches them with programmatic dependent
launch), median over replays (triton.testing.do_bench_cudagraph), per layer. The context defaults to the decode
protocol's middle (a 128-token prompt, 256 new tokens); max_blocks covers a 2,048-token context, as the default
compile does.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
import triton  # noqa: E402

from kernels import attention_decode as ad  # noqa: E402
from kernels.spec import alloc_scratch, run  # noqa: E402

MODELS = {"tinyllama-1.1b": (32, 4, 64, 22), "llama3-8b": (32, 8, 128, 32)}  # Hq, Hk, Dh, layers
BLOCK_SIZE, MAX_SEQ = 16, 2048


def case(hq: int, hk: int, dh: int, batch: int, context: int, gen: torch.Generator) -> tuple[dict, dict]:
    blocks = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks + 1
    dev, dt = "cuda", torch.bfloat16
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hk, dh, generator=gen, device=dev).to(dt)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, hk, dh, generator=gen, device=dev).to(dt)
    tables = torch.zeros(batch, MAX_SEQ // BLOCK_SIZE, dtype=torch.int32, device=dev)
    tables[:, :blocks] = 1 + torch.randperm(batch * blocks, generator=gen, device=dev).view(batch, blocks)
    tensors = {"qkv": torch.randn(batch, (hq + 2 * hk) * dh, generator=gen, device=dev).to(dt),
               "k_cache": k_cache, "v_cache": v_cache,
               "seq_lens": torch.full((batch,), context, dtype=torch.int32, device=dev), "block_tables": tables,
               "out": torch.full((batch, hq * dh), float("nan"), dtype=dt, device=dev)}
    meta = {"num_q_heads": hq, "num_kv_heads": hk, "head_dim": dh, "scale": dh ** -0.5, "block_size": BLOCK_SIZE,
            "max_blocks": MAX_SEQ // BLOCK_SIZE, "max_T": 256, "max_S": 256, "T_bucket": batch}
    return tensors, meta


def _layers(plan, tensors: dict, env: dict, layers: int, pdl: bool) -> None:
    for _ in range(layers):
        run(plan, tensors, env, interpret=False, pdl=pdl)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=384)
    p.add_argument("--batch", default="1,16,32", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--pdl", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [f"{torch.cuda.get_device_name()}, bf16, context {args.context}, PDL {'on' if args.pdl else 'off'}; "
             "µs per layer (one launch or two)", "",
             "| model | batch | NUM_SPLITS | BLOCK_N | launches | µs | max err |",
             "|---|---|---|---|---|---|---|"]
    for model, (hq, hk, dh, layers) in MODELS.items():
        for batch in args.batch:
            tensors, meta = case(hq, hk, dh, batch, args.context, gen)
            ref = ad.reference(**{k: v for k, v in tensors.items() if k != "out"}, num_q_heads=hq, num_kv_heads=hk,
                               head_dim=dh, scale=meta["scale"]).float()
            dtypes = {k: ad.dtype_name(v) for k, v in tensors.items()}
            for config in dict.fromkeys([ad.SPEC.default(meta), *ad.SPEC.configs(meta)]):
                plan = ad.SPEC.plan(meta, dtypes, config)
                scratch = alloc_scratch(plan, "cuda")
                env = {"T": batch, "S": batch}
                tensors["out"].fill_(float("nan"))
                run(plan, {**tensors, **scratch}, env, interpret=False, pdl=args.pdl)
                torch.cuda.synchronize()
                err = (tensors["out"].float() - ref).abs().max().item()

                step = functools.partial(_layers, plan, {**tensors, **scratch}, env, layers, args.pdl)
                step()
                ms = triton.testing.do_bench_cudagraph(step, rep=30, return_mode="median")
                c = dict(config.constexprs)
                line = (f"| {model} | {batch} | {c['NUM_SPLITS']} | {c['BLOCK_N']} | {len(plan.launches)} "
                        f"| {1000 * ms / layers:.2f} | {err:.1e}{' !' if err > 2e-2 else ''} |")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
