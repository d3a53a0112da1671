"""Choosing a config per kernel variant: autotune on the local GPU, else the tuning database, else the heuristic.

Autotuning times every candidate config of a variant at its token bucket with CUDA graphs (median over
replays, `triton.testing.do_bench_cudagraph`) on fresh random inputs cycled through several copies so that they
do not sit in L2, and keeps the fastest. Decisions
are written to the artifact's tuning.json and merged into compiler/tuning_db.json, keyed by GPU name and
Triton version, so a machine without that GPU can cross-compile tuned configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import triton

from compiler.lower import VariantSpec
from kernels.spec import DTYPE_NAMES, Config, Plan, alloc_scratch, run

DB_PATH = Path(__file__).with_name("tuning_db.json")


def db_section(gpu: str) -> str:
    return f"{gpu}|triton-{triton.__version__}"


def load_db(path: Path = DB_PATH) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_db(db: dict, path: Path = DB_PATH) -> None:
    path.write_text(json.dumps(db, indent=1, sort_keys=True) + "\n")


def _int_input(role: str, shape: tuple[int, ...], v: VariantSpec, env: dict, device) -> torch.Tensor:
    """Valid index tensors for a timing run: each sequence holds T/S query tokens over a long context."""
    meta = v.meta_dict()
    S, T = env["S"], env["T"]
    ctx = min(meta.get("max_blocks", 1) * meta.get("block_size", 16), 4096)
    if role == "cu_seqlens_q":
        return (torch.arange(S + 1, dtype=torch.int32) * (T // S)).clamp(max=T).to(device)
    if role == "seq_lens":
        return torch.full((S,), ctx, dtype=torch.int32, device=device)
    if role == "block_tables":
        return torch.arange(shape[0] * shape[1], dtype=torch.int32, device=device).view(shape) % (S * shape[1])
    if role in ("slot_mapping", "positions", "last_idx"):
        return torch.arange(shape[0], dtype=torch.int32, device=device)
    if role == "ids":
        return torch.randint(0, meta.get("V", 2), shape, dtype=torch.int32, device=device)
    if role == "top_k":
        return torch.zeros(shape, dtype=torch.int32, device=device)
    return torch.zeros(shape, dtype=DTYPE_NAMES[dict(v.dtypes)[role]], device=device)


def timing_inputs(v: VariantSpec, shapes: dict[str, tuple], env: dict, device) -> dict[str, torch.Tensor]:
    tensors = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for role, dt in v.dtypes:
        shape = shapes[role]
        if dt in ("i32", "i64"):
            tensors[role] = _int_input(role, shape, v, env, device)
        elif role in ("temperature", "top_p"):
            tensors[role] = torch.ones(shape, dtype=DTYPE_NAMES[dt], device=device)
        elif role == "min_p":
            tensors[role] = torch.zeros(shape, dtype=DTYPE_NAMES[dt], device=device)
        else:
            tensors[role] = (0.1 * torch.randn(shape, generator=gen, device=device)).to(DTYPE_NAMES[dt])
    return tensors


# Bytes of inputs cycled through per timed replay: several times a large GPU's L2 (H200: 60 MB), so that weights
# come from memory as in a whole model, not from the cache a lone kernel timed on repeat would leave them in.
ROTATE_BYTES = 256 << 20
MAX_COPIES = 32


def rotating_copies(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The timing inputs and enough clones of them that one pass over all exceeds ROTATE_BYTES."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    copies = max(1, min(MAX_COPIES, -(-ROTATE_BYTES // max(nbytes, 1))))
    return [tensors] + [{k: t.clone() for k, t in tensors.items()} for _ in range(copies - 1)]


def time_config(v: VariantSpec, config: Config, sets: list[dict], env: dict) -> float:
    """Median microseconds of one run of the variant's plan, replayed under a CUDA graph back to back over the
    input sets (see rotating_copies) with its scratch allocated once, as the runtime does. On sm_90 and later with
    programmatic dependent launch, as the runtime launches them by default there (kernels/pdl.py)."""
    plan: Plan = v.plan(config)
    device = sets[0][next(iter(sets[0]))].device
    scratch = alloc_scratch(plan, device)
    pdl = torch.cuda.get_device_capability(device)[0] >= 9

    def fn() -> None:
        for tensors in sets:
            run(plan, {**tensors, **scratch}, env, interpret=False, pdl=pdl)

    fn()  # compile outside the graph
    torch.cuda.synchronize()
    return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") / len(sets)


def autotune_variant(v: VariantSpec, shapes: dict[str, tuple], env: dict) -> tuple[Config, dict[str, float]]:
    """Fastest config among the spec's candidates; configs that fail to compile or run are skipped."""
    sets = rotating_copies(timing_inputs(v, shapes, env, torch.device("cuda")))
    timings: dict[str, float] = {}
    best, best_t = v.spec.default(v.meta_dict()), float("inf")
    for config in dict.fromkeys([*v.spec.configs(v.meta_dict()), best]):
        try:
            t = time_config(v, config, sets, env)
        except Exception as err:  # a config the GPU cannot run (shared memory, registers) is not a candidate
            timings[json.dumps(config.to_json(), sort_keys=True)] = float("nan")
            print(f"  skip {v.op} {config.to_json()}: {type(err).__name__}")
            continue
        timings[json.dumps(config.to_json(), sort_keys=True)] = round(t, 3)
        if t < best_t:
            best, best_t = config, t
    return best, timings
