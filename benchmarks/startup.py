"""Where start-up time goes: a fresh process from imports to the first sampled token, phase by phase.

    PYTHONPATH=. python -m benchmarks.startup artifacts/NAME [--backend cuda]

Prints seconds for: importing the runtime, loading and validating the artifact: the whole-file sha256 of every file
and each big file's chunk digests (`runtime verify`), then as a first start on a machine that never hashed it (an
empty verified cache: big files checked by their chunk digests in parallel threads), reading the weights' header,
building the backend (weights to the device, KV cache, binaries, CUDA-graph capture), the tokenizer, and the first
token of a short prompt; then the time from process start (the OS's clock, so the interpreter's own start-up counts)
and whether torch or triton were imported on the way (on cuda: neither).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

T0 = time.perf_counter()

import click  # noqa: E402


@click.command()
@click.argument("artifact")
@click.option("--backend", default="auto")
def main(artifact: str, backend: str) -> None:
    marks = [("python start -> main", time.perf_counter() - T0)]

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        marks.append((name, now - since))
        return now

    t = time.perf_counter()
    import runtime
    from runtime.artifact import load_artifact

    t = mark("import runtime", t)
    load_artifact(artifact, check_hashes=False)
    t = mark("load artifact, no hashes", t)
    load_artifact(artifact, rehash=True)
    t = mark("load artifact with sha256 of every file (runtime verify)", t)
    # A fresh, empty verified cache: what the first start on another machine (a copied artifact) costs.
    os.environ["TRILITE_CACHE"] = tempfile.mkdtemp(prefix="trilite-startup-")
    art = load_artifact(artifact)
    t = mark("load artifact, cold cache (chunk digests in parallel)", t)
    art.weight_ranges()  # the cuda backend copies the file's byte ranges itself: only the header is read here
    t = mark("read the weights' header", t)
    engine = runtime.load(artifact, backend=backend)
    t = mark(f"runtime.load (backend {engine.backend.name}) incl. the above again", t)
    engine.generate(["Hello"], runtime.SamplingParams(max_tokens=1, temperature=0))
    mark("first token", t)
    for name, seconds in marks:
        print(f"| {name} | {seconds:.2f} s |")
    print(f"| total from main's module import | {time.perf_counter() - T0:.2f} s |")
    from runtime.bench import process_age

    age = process_age()
    if age is not None:
        print(f"| process start -> first token | {age:.2f} s |")
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "triton"})
    print("imported:", heavy or "neither torch nor triton")


if __name__ == "__main__":
    main()
