"""Prefill attention of both benchmark presets, the pack's candidate configs and a wider space, on the GPU.

    PYTHONPATH=. python benchmarks/attention_prefill.py [--cases 1x2048,4x512,1x8192] [--space wide|pack]
        [--out FILE]

For each preset's heads (TinyLlama-1.1B: 32 q / 4 kv heads of 64; Llama-3-8B: 32 / 8 of 128) and each case of S
sequences of L new tokens (no cached prefix, the keys and values already in the paged cache as kv_cache_write leaves
them), every config is first checked on fresh random inputs with its output poisoned (NaN) against torch's
scaled_dot_product_attention on the dense q, k, v (causal, GQA), then timed with triton.testing.do_bench (median),
as is SDPA itself (its flash backend, bf16). TFLOP/s counts the causal half: 2 · 2 · S · L² / 2 · Hq · Dh.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
import triton  # noqa: E402

from kernels import attention_prefill as ap  # noqa: E402
from kernels.spec import Config, run  # noqa: E402

MODELS = {"tinyllama-1.1b": (32, 4, 64), "llama3-8b": (32, 8, 128)}  # Hq, Hk, Dh
BLOCK_SIZE = 16
WIDE = ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3),
        (128, 32, 4, 3), (128, 64, 4, 3), (256, 64, 8, 2), (256, 32, 8, 3), (128, 128, 4, 2), (64, 64, 4, 4))


def case(hq: int, hk: int, dh: int, S: int, L: int, gen: torch.Generator) -> tuple[dict, dict, tuple]:
    dev, dt = "cuda", torch.bfloat16
    blocks = -(-L // BLOCK_SIZE)
    qkv = torch.randn(S * L, (hq + 2 * hk) * dh, generator=gen, device=dev).to(dt)
    k_cache = torch.zeros(S * blocks + 1, BLOCK_SIZE, hk, dh, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    tables = (1 + torch.randperm(S * blocks, generator=gen, device=dev)).view(S, blocks).to(torch.int32)
    q, kd, vd = qkv.view(S, L, -1).split([hq * dh, hk * dh, hk * dh], -1)
    pos = torch.arange(L, device=dev)
    slots = (tables.long()[:, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE).view(-1)
    k_cache.view(-1, hk, dh)[slots] = kd.reshape(-1, hk, dh)
    v_cache.view(-1, hk, dh)[slots] = vd.reshape(-1, hk, dh)
    tensors = {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache,
               "cu_seqlens_q": torch.arange(S + 1, dtype=torch.int32, device=dev) * L,
               "seq_lens": torch.full((S,), L, dtype=torch.int32, device=dev), "block_tables": tables,
               "out": torch.full((S * L, hq * dh), float("nan"), dtype=dt, device=dev)}
    meta = {"num_q_heads": hq, "num_kv_heads": hk, "head_dim": dh, "scale": dh ** -0.5, "block_size": BLOCK_SIZE,
            "max_blocks": blocks, "max_T": S * L, "max_S": S, "T_bucket": S * L}
    heads = tuple(t.reshape(S, L, -1, dh).transpose(1, 2) for t in (q, kd, vd))
    return tensors, meta, heads


def candidates(meta: dict, space: str) -> list[Config]:
    pack = [ap.SPEC.default(meta), *ap.SPEC.configs(meta)]
    if space == "pack" or meta["head_dim"] > 128:
        return list(dict.fromkeys(pack))
    group = meta["num_q_heads"] // meta["num_kv_heads"]
    wide = [Config.make(num_warps=w, num_stages=st, BLOCK_M=m, BLOCK_N=n) for m, n, w, st in WIDE if m >= group]
    return list(dict.fromkeys(pack + wide))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="1x2048,4x512,1x8192",
                   type=lambda s: [tuple(int(v) for v in c.split("x")) for c in s.split(",")])
    p.add_argument("--space", default="wide", choices=("wide", "pack"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [f"{torch.cuda.get_device_name()}, bf16, causal, no cached prefix; SDPA = torch "
             f"{torch.__version__} scaled_dot_product_attention (flash)", "",
             "| model | S×L | best µs | TFLOP/s | SDPA µs | × SDPA | pack default µs | best config | ok/tried |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, (hq, hk, dh) in MODELS.items():
        for S, L in args.cases:
            tensors, meta, heads = case(hq, hk, dh, S, L, gen)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                ref = F.scaled_dot_product_attention(*heads, is_causal=True, scale=meta["scale"], enable_gqa=True)
                sdpa = functools.partial(F.scaled_dot_product_attention, *heads, is_causal=True,
                                         scale=meta["scale"], enable_gqa=True)
                sdpa_us = 1000 * triton.testing.do_bench(sdpa, return_mode="median")
            ref = ref.transpose(1, 2).reshape(S * L, hq * dh).float()
            dtypes = {k: ap.dtype_name(v) for k, v in tensors.items()}
            flops = 2 * 2 * S * L * L / 2 * hq * dh
            results = []
            configs = candidates(meta, args.space)
            for config in configs:
                try:
                    plan = ap.SPEC.plan(meta, dtypes, config)
                    env = {"T": S * L, "S": S}
                    tensors["out"].fill_(float("nan"))
                    run(plan, tensors, env, interpret=False)
                    torch.cuda.synchronize()
                    got = tensors["out"].float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    if got.isnan().any().item() or err > 1e-2:
                        print(f"  wrong {model} {S}x{L} {config.to_json()}: rel err {err:.3g}", flush=True)
                        continue
                    ours = functools.partial(run, plan, tensors, env, interpret=False)
                    us = 1000 * triton.testing.do_bench(ours, return_mode="median")
                except Exception as e:  # a config that does not compile or fit is reported and skipped
                    print(f"  fail {model} {S}x{L} {config.to_json()}: {type(e).__name__}: {e}"[:240], flush=True)
                    continue
                results.append((us, config))
                print(f"  {model} {S}x{L} {config.to_json()} {us:.1f} µs", flush=True)
            if not results:
                continue
            default = ap.SPEC.default(meta)
            default_us = next((us for us, c in results if c == default), float("nan"))
            us, best = min(results, key=lambda r: r[0])
            desc = (f"M{best['BLOCK_M']} N{best['BLOCK_N']} w{best.num_warps} st{best.num_stages}")
            lines.append(f"| {model} | {S}×{L} | {us:.1f} | {flops / us / 1e6:.0f} | {sdpa_us:.1f} | "
                         f"{sdpa_us / us:.2f} | {default_us:.1f} | {desc} | {len(results)}/{len(configs)} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
