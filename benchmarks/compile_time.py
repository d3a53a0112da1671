"""Where compile time goes: each model compiled from its source, phase by phase, as `compiler compile` runs it.

    python3 -m benchmarks.compile_time tinyllama-1.1b llama3-8b --fresh [--autotune] [--cache DIR]
    python3 -m benchmarks.compile_time llama3-8b --layers 4 --fresh     # a shorter model of the same shape

Phases (BuildReport.seconds): preset (drawing, writing and hashing a random preset; 0 when cached), load (the
source's tensors read into memory; an HF directory is hashed here too), trace, passes (merges, folds, casts),
configs or autotune, compile (AOT kernels; cached binaries are reused), write (weights, streamed and hashed;
graph, tokenizer, tuning), reference (HF transformers logits), hash (the other files, manifest), total.
--fresh deletes the preset first; --cache points $TRILITE_CACHE elsewhere (an empty one also compiles every
kernel again, as a fresh machine would).
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click

PHASES = ("preset", "load", "trace", "passes", "configs", "autotune", "compile", "write", "reference", "hash",
          "total")


def truncated_preset(name: str, layers: int, fresh: bool) -> tuple[str, float]:
    """The preset with only ``layers`` decoder layers, as an HF directory beside the presets; (path, seconds)."""
    from artifact_format.layout import cache_dir
    from compiler.frontends.presets import PRESETS
    from compiler.frontends.random_model import read_stamp, write_random_model

    spec = PRESETS[name].random
    spec = replace(spec, config={**spec.config, "num_hidden_layers": layers})
    dest = cache_dir() / "presets" / f"{name}-{layers}l"
    if fresh:
        shutil.rmtree(dest, ignore_errors=True)
    t = time.perf_counter()
    if read_stamp(dest).get("recipe") != spec.recipe(spec.generator()):
        write_random_model(spec, dest)
    return str(dest), time.perf_counter() - t


def compile_one(name: str, layers: int | None, fresh: bool, autotune: bool, reference: bool,
                targets: tuple[str, ...], dtype: str | None) -> dict[str, float]:
    from artifact_format.layout import cache_dir
    from compiler.build import build

    preset_seconds = None
    if layers:
        source, preset_seconds = truncated_preset(name, layers, fresh)
    else:
        source = name
        if fresh:
            shutil.rmtree(cache_dir() / "presets" / name, ignore_errors=True)
    out = Path(tempfile.mkdtemp(prefix="compile-time-")) / Path(source).name
    try:
        report = build(source, out, targets=list(targets) or None, dtype=dtype, autotune=autotune,
                       reference=reference)
        seconds = dict(report.seconds)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    if preset_seconds is not None:
        seconds["preset"] = preset_seconds
        seconds["total"] += preset_seconds
    seconds["artifact GiB"] = size / 2**30
    seconds["binaries compiled"] = report.compiled
    return seconds


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--layers", type=int, default=None, help="Keep only this many decoder layers (random presets).")
@click.option("--fresh", is_flag=True, help="Delete the preset first, so it is drawn and written again.")
@click.option("--cache", type=click.Path(path_type=Path), default=None, help="$TRILITE_CACHE for this run.")
@click.option("--autotune/--no-autotune", default=False, show_default=True)
@click.option("--reference/--no-reference", default=True, show_default=True)
@click.option("--target", "targets", multiple=True, help="As compiler compile --target (default: this GPU).")
@click.option("--dtype", default=None, help="As compiler compile --dtype.")
def main(models: tuple[str, ...], layers: int | None, fresh: bool, cache: Path | None, autotune: bool,
         reference: bool, targets: tuple[str, ...], dtype: str | None) -> None:
    if cache is not None:
        os.environ["TRILITE_CACHE"] = str(cache)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"{gpu}; {os.cpu_count()} CPUs; torch {torch.__version__}")
    columns = {m: compile_one(m, layers, fresh, autotune, reference, targets, dtype) for m in models}
    label = f" ({layers} layers)" if layers else ""
    print("| phase | " + " | ".join(f"{m}{label}" for m in models) + " |")
    print("|---|" + "---|" * len(models))
    keys = [k for k in PHASES if any(k in c for c in columns.values())]
    keys += [k for k in next(iter(columns.values())) if k not in PHASES]
    for key in keys:
        cells = [columns[m].get(key) for m in models]
        unit = "" if key in ("artifact GiB", "binaries compiled") else " s"
        print(f"| {key} | " + " | ".join("" if c is None else f"{c:.1f}{unit}" for c in cells) + " |")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
          + (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available()
             else ""))


if __name__ == "__main__":
    main()
