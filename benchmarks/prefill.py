"""Time to first token on the GPU (issue 13): prefill speed, the mixed-step stall test, the prefix-cache TTFT.

    PYTHONPATH=. python -m benchmarks.prefill artifacts/llama3-8b [artifacts/tinyllama-1.1b ...]
        [--lengths 512,2048,8192] [--decoders 16] [--long 4096] [--prefix 2000] [--backend cuda] [--out prefill.md]

- ppN: one prompt of N random tokens through the public API (``generate``, max_tokens=1, prefix cache off), after
  a warm-up of the same length; tok/s = N / TTFT. Lengths beyond the artifact's max_seq_len are skipped (say so).
- stall: the server's engine loop (no HTTP) runs ``--decoders`` streaming sequences (128-token prompts, greedy,
  256 new tokens, both capped by max_seq_len); once each has 32 tokens a ``--long``-token prompt arrives. For each
  running sequence: its median gap between tokens before the arrival, and its worst gap from the arrival until the
  long prompt's first token; reported as worst / median over all sequences, with mixed steps off and on at each
  ``--budgets`` step budget (the issue's target: <= 3x with them on), and the running sequences' tokens compared
  with mixed steps off (in fp32 they are equal, tests/gpu/test_scheduling_gpu.py; in bf16 the row says where
  they first differ).
- prefix: TTFT of a prompt whose first ``--prefix`` tokens are cached (an earlier request had them), against the
  same-length prompt with a fresh prefix (target: <= 15%).

Every number is a median over a few repeats; the card and copy bandwidth are printed beside them. ``--backend
torch`` runs the same script on the CPU (a smoke test on a tiny artifact, not a result).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import click
import torch

import runtime
from runtime.sampling import SamplingParams
from runtime.serving.engine_loop import EngineLoop, ErrorEvent, PromptEvent
from runtime.serving.metrics import Metrics
from runtime.serving.protocol import Generation

REPEATS = 3


def _sync(backend: str) -> None:
    if backend in ("cuda", "hip") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _tokens(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def ttft(engine, prompt: list[int], backend: str) -> float:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    _sync(backend)
    t = time.perf_counter()
    engine.generate([prompt], params)
    _sync(backend)
    return time.perf_counter() - t


def pp_rows(path: str, backend: str, lengths: list[int]) -> list[str]:
    engine = runtime.load(path, backend=backend, prefix_cache=False)
    limit = engine.limits.max_seq_len - 1
    rows = []
    for n in lengths:
        if n > limit:
            rows.append(f"| {Path(path).name} | pp{n} | – | – | skipped: max_seq_len {limit + 1} |")
            continue
        ttft(engine, _tokens(engine.vocab_size, n, seed=n), backend)  # warm-up of this length
        times = [ttft(engine, _tokens(engine.vocab_size, n, seed=n + k), backend) for k in range(REPEATS)]
        t = statistics.median(times)
        rows.append(f"| {Path(path).name} | pp{n} | {n / t:.0f} | {1000 * t:.1f} | |")
        print(rows[-1], flush=True)
    engine.close()  # each test loads its own engine: give this one's GPU memory back first
    return rows


def prefix_row(path: str, backend: str, prefix: int) -> str:
    engine = runtime.load(path, backend=backend, prefix_cache=True)
    prefix = min(prefix, engine.limits.max_seq_len - 64)
    v = engine.vocab_size
    ttft(engine, _tokens(v, prefix + 32, seed=1), backend)  # warm-up
    cold, warm = [], []
    for k in range(REPEATS):
        shared = _tokens(v, prefix, seed=100 + k)  # a prefix no earlier request had
        cold.append(ttft(engine, shared + _tokens(v, 32, seed=200 + k), backend))
        warm.append(ttft(engine, shared + _tokens(v, 32, seed=300 + k), backend))
    c, w = statistics.median(cold), statistics.median(warm)
    row = (f"| {Path(path).name} | prefix {prefix} + 32 | {1000 * c:.1f} ms uncached | {1000 * w:.1f} ms cached | "
           f"{100 * w / c:.0f}% |")
    print(row, flush=True)
    engine.close()
    return row


async def _stall_run(engine, decoders: int, long_len: int) -> tuple[list[float], list[float], list[list[int]]]:
    """(each decoder's median gap before the arrival, its worst gap while the long prompt prefills, its tokens)."""
    loop = EngineLoop(engine, Metrics(), max_queue=4 * decoders)
    loop.start()
    try:
        v = engine.vocab_size

        def gen(ids: list[int], max_tokens: int) -> Generation:
            return Generation("completion", None, (tuple(ids),), ("",),
                              SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), stream=True)

        plen = min(128, engine.limits.max_seq_len // 4)
        new = min(256, engine.limits.max_seq_len - plen - 1)
        handles = [loop.submit(gen(_tokens(v, plen, seed=10 + i), new)) for i in range(decoders)]
        stamps: list[list[float]] = [[] for _ in handles]
        tokens: list[list[int]] = [[] for _ in handles]
        arrived = {"at": None, "first": None}

        async def follow(i: int, handle) -> None:
            while True:
                event = await asyncio.wait_for(handle.events.get(), 600)
                if isinstance(event, ErrorEvent):
                    raise RuntimeError(event.message)
                if isinstance(event, PromptEvent):
                    continue
                stamps[i] += [time.perf_counter()] * len(event.token_ids)
                tokens[i] += event.token_ids
                if event.finish_reason is not None:
                    return

        async def long_prompt() -> None:
            while min(len(s) for s in stamps) < 32:
                await asyncio.sleep(0.001)
            arrived["at"] = time.perf_counter()
            handle = loop.submit(gen(_tokens(v, long_len, seed=7), 1))
            while True:
                event = await asyncio.wait_for(handle.events.get(), 600)
                if not isinstance(event, PromptEvent):
                    arrived["first"] = time.perf_counter()
                    return

        await asyncio.gather(long_prompt(), *(follow(i, h) for i, h in enumerate(handles)))
    finally:
        loop.stop()
    normal, worst = [], []
    for s in stamps:
        gaps = [b - a for a, b in zip(s, s[1:]) if b > a]  # tokens of one event share a stamp
        before = [b - a for a, b in zip(s, s[1:]) if b > a and b < arrived["at"]]
        during = [b - a for a, b in zip(s, s[1:]) if b > a and a >= arrived["at"] - 1e-3 and a <= arrived["first"]]
        normal.append(statistics.median(before or gaps))
        worst.append(max(during or [0.0]))
    return normal, worst, tokens


def _agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """'identical', else how many sequences differ and where each first differs (bf16 GEMM tilings of a mixed step
    differ from a decode step's GEMV, so a near-tie of random weights can flip a greedy token)."""
    firsts = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t))) for s, t in zip(a, b)
              if s != t]
    if not firsts:
        return "identical"
    return f"{len(firsts)} of {len(a)} differ, first at token {min(firsts)} (median {statistics.median(firsts):.0f})"


def stall_rows(path: str, backend: str, decoders: int, long_len: int, budgets: list[int | None]) -> list[str]:
    """The stall test with mixed steps off, then on at each step budget (None: the artifact's max_num_tokens)."""
    rows, outputs = [], {}
    for budget in [0, *budgets]:
        mixed = budget != 0
        engine = runtime.load(path, backend=backend, mixed_steps=mixed,
                              max_num_batched_tokens=budget if mixed else None)
        n = min(long_len, engine.limits.max_seq_len - 1)
        d = min(decoders, engine.limits.max_batch - 1)
        asyncio.run(_stall_run(engine, d, 64))  # warm-up: graphs, prefill variants
        normal, worst, outputs[budget] = asyncio.run(_stall_run(engine, d, n))
        ratio = max(w / m for w, m in zip(worst, normal))
        setting = (f"mixed steps on, budget {engine.scheduler.max_num_tokens}" if mixed else "mixed steps off")
        rows.append(f"| {Path(path).name} | stall, {d} decoding + {n}-token prompt | {setting} | step "
                    f"{1000 * statistics.median(normal):.2f} ms | worst gap {1000 * max(worst):.1f} ms "
                    f"({ratio:.1f}x) |")
        print(rows[-1], flush=True)
        if mixed:
            rows.append(f"| {Path(path).name} | stall outputs, budget {budget or 'max'} vs mixed off | "
                        f"{_agreement(outputs[budget], outputs[0])} | | |")
            print(rows[-1], flush=True)
        engine.close()
    return rows


@click.command()
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--lengths", default="512,2048,8192", show_default=True)
@click.option("--decoders", default=16, show_default=True)
@click.option("--long", "long_len", default=4096, show_default=True)
@click.option("--prefix", default=2000, show_default=True)
@click.option("--backend", default="cuda", show_default=True)
@click.option("--budgets", default="256,512,max", show_default=True,
              help="step token budgets (--max-num-batched-tokens) of the mixed-step stall runs; max: the artifact's")
@click.option("--out", default=None, help="also write the tables here (markdown)")
def main(artifacts: tuple[str, ...], lengths: str, decoders: int, long_len: int, prefix: int, backend: str,
         budgets: str, out: str | None) -> None:
    card = torch.cuda.get_device_name() if backend in ("cuda", "hip") else f"{backend} backend (CPU)"
    lines = [f"{card}, prefill through the public API and the server's engine loop", "",
             "| model | test | tok/s / result | TTFT ms / result | note |", "|---|---|---|---|---|"]
    for path in artifacts:
        lines += pp_rows(path, backend, [int(x) for x in lengths.split(",")])
        lines.append(prefix_row(path, backend, prefix))
        lines += stall_rows(path, backend, decoders, long_len,
                            [None if b == "max" else int(b) for b in budgets.split(",")])
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
