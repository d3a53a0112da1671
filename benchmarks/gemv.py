"""Decode GEMVs (linear, rms_norm_linear) of both benchmark presets over a wide config space, on the GPU.

    PYTHONPATH=. python benchmarks/gemv.py --out DIR [--rows 1,4,16,32] [--models tinyllama-1.1b,llama3-8b]
        [--space wide|pack] [--jobs 15] [--budget 420]

For every decode matrix of the two presets (qkv and gate_up with the RMSNorm fold, qkv with the rope and KV-cache
write epilogue, gate_up with the SwiGLU epilogue, o and down with the residual epilogue) and every row count, each
candidate config is first checked against the op's reference on fresh random inputs with its output poisoned
(NaN), then timed. Timing replays a CUDA graph of back-to-back launches over enough copies of the weights to exceed
L2 several times (in a model the weights never stay in L2), as the decode graph runs them; the median over
replays, per launch. cuBLAS (torch.nn.functional.linear, plain product without the epilogue) is timed the same
way. GB/s counts the bytes the op must move (weight, activations in, output, residual and KV-cache rows); % is
against a device-to-device copy measured in the same process (bytes read + written).

--space wide sweeps far more configs than the autotuner tries (to find what the pack's space must contain);
--space pack only the pack's own candidates and heuristic default. Compilation runs first in --jobs processes
(filling Triton's cache), then one process times everything; results stream to DIR/gemv.jsonl, and a table of
the best config per shape goes to DIR/gemv.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
import triton  # noqa: E402

from kernels import linear as lin  # noqa: E402
from kernels import rms_norm_linear as rnl  # noqa: E402
from kernels.matmul_configs import gemm, gemv  # noqa: E402
from kernels.spec import Config, alloc_scratch, run  # noqa: E402
from runtime.bench import copy_bandwidth  # noqa: E402

EPS = 1e-5
MODELS = {"tinyllama-1.1b": (2048, 5632, 32, 4, 64), "llama3-8b": (4096, 14336, 32, 8, 128)}  # H, I, Hq, Hk, Dh
ROTATE_BYTES = 512 << 20  # weights cycled per timed replay: several times the H200's 60 MB of L2
MAX_POS, BLOCK_SIZE = 4096, 16  # the qkv epilogue's rope table rows and KV-cache block size


@dataclass(frozen=True)
class Shape:
    model: str
    name: str  # qkv, o, gate_up, down
    K: int
    N: int
    heads: tuple[int, int, int] = (0, 0, 0)  # qkv: Hq, Hk, Dh (its rope epilogue)

    @property
    def op(self) -> str:
        return "rms_norm_linear" if self.name in ("qkv", "gate_up") else "linear"

    def meta(self, T: int) -> dict:
        """The op's metadata for T rows, with the token bucket the runtime's variant for T has (the smallest of
        the spec's tune_buckets that holds T): the pack's candidates are those the compiler tries for it."""
        spec = rnl.SPEC if self.op == "rms_norm_linear" else lin.SPEC
        bucket = min((b for b in spec.tune_buckets if b >= T), default=T)
        base = {"K": self.K, "N": self.N, "max_T": T, "max_S": T, "T_bucket": bucket}
        if self.op == "linear":
            return {**base, "has_bias": False, "has_residual": True}
        if self.name == "qkv":  # as the decode graph runs it: the rope and the KV-cache write in the epilogue
            Hq, Hk, Dh = self.heads
            return {**base, "eps": EPS, "has_bias": False, "act": "rope", "num_q_heads": Hq, "num_kv_heads": Hk,
                    "head_dim": Dh, "rotary_dim": Dh, "is_neox": True, "write_cache": True}
        return {**base, "eps": EPS, "has_bias": False, "act": "silu_mul" if self.name == "gate_up" else None}


def shapes(models: list[str]) -> list[Shape]:
    out = []
    for m in models:
        H, I, Hq, Hk, Dh = MODELS[m]
        out += [Shape(m, "qkv", H, (Hq + 2 * Hk) * Dh, (Hq, Hk, Dh)), Shape(m, "o", H, H),
                Shape(m, "gate_up", H, 2 * I), Shape(m, "down", I, H)]
    return out


def wide_space(shape: Shape, T: int) -> list[Config]:
    K, N = shape.K, shape.N
    min_bn = 2 if shape.name in ("gate_up", "qkv") else 1  # the SwiGLU and rope epilogues pair columns
    out = []
    if T <= 4:
        bm = triton.next_power_of_2(T)
        tiles = ((2048, 4), (4096, 4), (8192, 4), (8192, 8), (16384, 8)) if T == 1 else ((4096, 4), (8192, 8))
        bks = (128, 256, 512, 1024, 2048) if T == 1 else (128, 256, 512)
        for elems, warps in tiles:
            for bk in bks:
                bn = elems // (bk * bm)
                if bn < min_bn or bk > K:
                    continue
                for split in (1, 2, 4, 8, 16):
                    if K // split >= bk and triton.cdiv(N, bn) * split <= 32768:
                        out.append(gemv(bm, bn, bk, split, False, warps, 1))
    bm = max(16, triton.next_power_of_2(T))
    if 4 <= T <= 64:
        for bn, bk in ((64, 64), (64, 128), (128, 64), (32, 128)):
            for stages in (3, 4):
                for split in (1, 2, 4, 8):
                    if K // split >= bk:
                        out.append(gemv(bm, bn, bk, split, True, 4, stages))
    elif 64 < T <= 256:
        # A mixed step's few hundred rows: as the decode layout with tl.dot, split K so that a shape of few column
        # blocks still fills every SM (a 128-row GEMM tile grid has only N / BLOCK_N programs).
        for bn, bk in ((64, 64), (64, 128), (128, 64)):
            for stages in (3, 4):
                for split in (1, 2, 4, 8):
                    if K // split >= bk:
                        out.append(gemv(bm, bn, bk, split, True, 8, stages))
    return out


def gemm_space(T: int) -> list[Config]:
    """Prefill tiles (T >= 128): wgmma-sized tiles with 64-wide K steps and 3-4 stages (sm_90's 227 KB of shared
    memory), next to the pack's own smaller ones."""
    if T < 128:
        return []
    tiles = ((128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
             (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3),
             (64, 256, 64, 4, 4), (128, 256, 32, 8, 4), (128, 128, 128, 8, 3), (256, 128, 32, 8, 4))
    return [gemm(bm, bn, bk, w, st) for bm, bn, bk, w, st in tiles]


def pack_configs(shape: Shape, T: int) -> list[Config]:
    """What the compiler tries for this shape and bucket, and its default."""
    spec = rnl.SPEC if shape.op == "rms_norm_linear" else lin.SPEC
    meta = shape.meta(T)
    return [*spec.configs(meta), spec.default(meta)]


def candidates(shape: Shape, T: int, space: str) -> list[Config]:
    pack = pack_configs(shape, T)
    return list(dict.fromkeys(pack + (wide_space(shape, T) + gemm_space(T) if space == "wide" else [])))


def make_inputs(shape: Shape, T: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    x = torch.randn(T, shape.K, generator=gen, device="cuda").mul_(2.0).add_(0.3).bfloat16()
    w = (torch.randn(shape.N, shape.K, generator=gen, device="cuda") / shape.K**0.5).bfloat16()
    n_out = shape.N // 2 if shape.name == "gate_up" else shape.N
    t = {"x": x, "w": w, "out": torch.full((T, n_out), float("nan"), device="cuda", dtype=torch.bfloat16)}
    if shape.op == "linear":
        t["residual"] = torch.randn(T, shape.N, generator=gen, device="cuda").bfloat16()
    if shape.name == "qkv":
        _, Hk, Dh = shape.heads
        angles = torch.rand(MAX_POS, Dh // 2, generator=gen, device="cuda") * 6.3
        t |= {"positions": torch.randint(0, MAX_POS, (T,), generator=gen, device="cuda", dtype=torch.int32),
              "cos_sin": torch.cat([angles.cos(), angles.sin()], dim=1).contiguous(),
              "slot_mapping": torch.randperm(T * BLOCK_SIZE, generator=gen, device="cuda")[:T].to(torch.int32),
              **{c: torch.zeros(T, BLOCK_SIZE, Hk, Dh, device="cuda", dtype=torch.bfloat16)
                 for c in ("k_cache", "v_cache")}}
    return t


def reference(shape: Shape, t: dict) -> torch.Tensor:
    if shape.op == "linear":
        return lin.reference(t["x"], t["w"], None, t["residual"])
    if shape.name == "qkv":  # qkv only: the caches are the reference's own copies
        rope = {k: t[k] for k in ("positions", "cos_sin", "slot_mapping")}
        caches = {c: t[c].clone() for c in ("k_cache", "v_cache")}
        meta = shape.meta(1)
        attrs = {k: meta[k] for k in ("num_q_heads", "num_kv_heads", "head_dim", "rotary_dim", "is_neox",
                                      "write_cache")}
        return rnl.reference(t["x"], t["w"], None, **rope, **caches, eps=EPS, act="rope", **attrs)[0]
    return rnl.reference(t["x"], t["w"], None, eps=EPS, act="silu_mul" if shape.name == "gate_up" else None)


def plan_for(shape: Shape, T: int, config: Config):
    dtypes = {"x": "bf16", "w": "bf16", "out": "bf16", "residual": "bf16", "positions": "i32", "cos_sin": "fp32",
              "slot_mapping": "i32", "k_cache": "bf16", "v_cache": "bf16"}
    spec = rnl.SPEC if shape.op == "rms_norm_linear" else lin.SPEC
    return spec.plan(shape.meta(T), dtypes, config)


def moved_bytes(shape: Shape, T: int) -> int:
    n_out = shape.N // 2 if shape.name == "gate_up" else shape.N
    res = T * shape.N * 2 if shape.op == "linear" else 0
    cache = 2 * T * shape.heads[1] * shape.heads[2] * 2  # the rope epilogue's k and v rows (qkv only)
    return shape.N * shape.K * 2 + T * shape.K * 2 + T * n_out * 2 + res + cache


def graph_time(fn, copies: int) -> float:
    """Median microseconds per launch of ``fn`` (which runs ``copies`` launches) replayed as a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") / copies


def _cublas(sets: list[dict], ws: list[torch.Tensor]) -> None:
    for s, w in zip(sets, ws):
        torch.nn.functional.linear(s["x"], w)


def _launches(plan, scratch: dict, sets: list[dict], T: int, pdl: bool) -> None:
    for t in sets:
        run(plan, {**t, **scratch}, {"T": T, "S": T}, interpret=False, pdl=pdl)


def jobs(args) -> list[tuple[Shape, int, Config]]:
    return [(s, T, c) for T in args.rows for s in shapes(args.models) for c in candidates(s, T, args.space)
            if not args.only or s.name in args.only]


def compile_shard(args) -> None:
    """Run each config of this shard once on small random inputs: fills Triton's on-disk cache."""
    i, n = map(int, args.shard.split("/"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = {}
    for j, (shape, T, config) in enumerate(jobs(args)):
        if j % n != i:
            continue
        key = (shape, T)
        if key not in inputs:
            inputs[key] = make_inputs(shape, T, gen)
        plan = plan_for(shape, T, config)
        try:
            run(plan, {**inputs[key], **alloc_scratch(plan, "cuda")}, {"T": T, "S": T}, interpret=False,
                pdl=args.pdl)
        except Exception as err:  # reported again (and skipped) by the timing pass
            print(f"compile failed: {shape} T={T} {config}: {type(err).__name__}: {err}"[:300], flush=True)
    torch.cuda.synchronize()


def time_all(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    bw = copy_bandwidth(torch.device("cuda")) / 1e9
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    start = time.time()
    rows, best = [], {}
    log = open(os.path.join(args.out, "gemv.jsonl"), "w")
    todo = jobs(args)
    by_key: dict = {}
    for shape, T, config in todo:
        by_key.setdefault((shape, T), []).append(config)
    for (shape, T), configs in by_key.items():
        if time.time() - start > args.budget:
            print(f"budget spent: stopping before {shape} T={T}", flush=True)
            break
        copies = max(1, min(64, -(-(args.rotate_mb << 20) // (shape.N * shape.K * 2))))
        sets = [make_inputs(shape, T, gen) for _ in range(copies)]
        want, want_last = reference(shape, sets[0]).float(), reference(shape, sets[-1]).float()
        nbytes = moved_bytes(shape, T)
        ws = [s["w"] for s in sets]
        cublas = graph_time(functools.partial(_cublas, sets, ws), copies)
        results = []
        for config in configs:
            plan = plan_for(shape, T, config)
            scratch = alloc_scratch(plan, "cuda")
            try:
                sets[0]["out"].fill_(float("nan"))  # out is its own buffer here: residual is only read
                run(plan, {**sets[0], **scratch}, {"T": T, "S": T}, interpret=False, pdl=args.pdl)
                got = sets[0]["out"].float()
                err = ((got - want).norm() / want.norm()).item()
                ok = err < 2e-2 and not got.isnan().any().item()
                sets[-1]["out"].fill_(float("nan"))
                us = graph_time(functools.partial(_launches, plan, scratch, sets, T, args.pdl), copies)
                # After hundreds of replays (a race between the splits would show here) and the semaphores re-armed.
                last = sets[-1]["out"].float()
                err = max(err, ((last - want_last).norm() / want_last.norm()).item())
                ok = ok and err < 2e-2 and not last.isnan().any().item() and not scratch.get(
                    "semaphores", torch.zeros(1, device="cuda")).any().item()
            except Exception as e:
                print(f"  fail {shape.model} {shape.name} T={T} {config.to_json()}: {type(e).__name__}"[:200])
                continue
            rec = {"model": shape.model, "shape": shape.name, "K": shape.K, "N": shape.N, "T": T,
                   "config": config.to_json(), "us": round(us, 2), "gbps": round(nbytes / us / 1e3, 1),
                   "tflops": round(2 * T * shape.N * shape.K / us / 1e6, 1),
                   "cublas_tflops": round(2 * T * shape.N * shape.K / cublas / 1e6, 1),
                   "pct": round(100 * nbytes / us / 1e3 / bw, 1), "err": err, "ok": ok, "cublas_us": round(cublas, 2)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if ok:
                results.append(rec)
        results.sort(key=lambda r: r["us"])
        if results:
            b = results[0]
            best[(shape, T)] = b
            c = b["config"]
            cc = c["constexprs"]
            desc = (f"{'dot' if cc['USE_DOT'] else 'bc'} M{cc['BLOCK_M']} N{cc['BLOCK_N']} K{cc['BLOCK_K']} "
                    f"s{cc['SPLIT_K']} w{c['num_warps']} st{c['num_stages']}")
            pack = [r for r in results if Config.from_json(r["config"]) in pack_configs(shape, T)]
            pack_us = pack[0]["us"] if pack else float("nan")
            line = (f"| {shape.model} | {shape.name} {shape.K}->{shape.N} | {T} | {nbytes / 1e6:.1f} | {b['us']} | "
                    f"{b['gbps']} | {b['pct']}% | {b['tflops']} | {cublas:.2f} | {cublas / b['us']:.2f} | "
                    f"{pack_us} | {desc} | {len(results)}/{len(configs)} |")
            rows.append(line)
            print(line, flush=True)
        sets.clear()
        torch.cuda.empty_cache()
    head = (f"GEMVs on {torch.cuda.get_device_name()}, bf16, copy bandwidth {bw:.0f} GB/s (read + written), "
            f"PDL {'on' if args.pdl else 'off'}\n\n"
            "| model | shape | T | MB moved | µs | GB/s | % of copy | TFLOP/s | cuBLAS µs | × cuBLAS "
            "| best of the pack µs | best config | ok/tried |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    with open(os.path.join(args.out, "gemv.md"), "w") as f:
        f.write(head + "\n".join(rows) + "\n")
    print(head + "\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-out")
    p.add_argument("--rows", default="1,4,16,32", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--models", default="tinyllama-1.1b,llama3-8b", type=lambda s: s.split(","))
    p.add_argument("--space", default="wide", choices=("wide", "pack"))
    p.add_argument("--jobs", type=int, default=15)
    p.add_argument("--budget", type=float, default=420.0, help="seconds of timing before stopping")
    p.add_argument("--pdl", action="store_true", help="USE_PDL on, launched with programmatic dependent launch")
    p.add_argument("--rotate-mb", type=int, default=ROTATE_BYTES >> 20,
                   help="weight bytes cycled per timed replay (at most 64 copies of a shape's weight)")
    p.add_argument("--only", default=None, type=lambda s: s.split(","), help="shape names to run (qkv,o,gate_up,down)")
    p.add_argument("--phase", default="all", choices=("all", "compile", "time"))
    p.add_argument("--shard", default="0/1")
    args = p.parse_args()
    if args.phase == "compile":
        return compile_shard(args)
    if args.phase == "all" and args.jobs > 1:
        t0 = time.time()
        base = [sys.executable, os.path.abspath(__file__), "--phase", "compile", "--rows",
                ",".join(map(str, args.rows)), "--models", ",".join(args.models), "--space", args.space,
                *(["--pdl"] if args.pdl else []), *(["--only", ",".join(args.only)] if args.only else [])]
        procs = [subprocess.Popen([*base, "--shard", f"{i}/{args.jobs}"]) for i in range(args.jobs)]
        for proc in procs:
            proc.wait()
        print(f"compiled {len(jobs(args))} configs in {time.time() - t0:.0f} s on {args.jobs} processes", flush=True)
    time_all(args)


if __name__ == "__main__":
    main()
