"""Load test for `runtime serve`: 1, 8 and 32 concurrent streaming clients, output tok/s, TTFT and TPOT percentiles.

    runtime serve artifacts/llama3-8b-shape --port 8000 &
    python3 benchmarks/serve_load.py --url http://127.0.0.1:8000 --prompt-tokens 128 --max-tokens 256

Every client sends fixed token-id prompts (so every request has exactly --prompt-tokens tokens) with ignore_eos,
streams the answer and records when each chunk came. Bounded: --requests per level (default 2 x clients) and a
--time-limit per level; only loopback addresses are accepted. Output tok/s is the tokens of every request over
the level's wall time; TTFT is request sent -> first token; TPOT is a request's (last - first token) / (n - 1).
Compare the 32-client rate with `runtime bench ARTIFACT --batch 32` (the goal: >= 90% of it).

Client-side times are when text arrives. A token whose text is held back (half a character; or, with a random
preset's small tokenizer, an id it has no text for) sends no chunk, so on random presets those times lag the
tokens. The server's own view, from its /metrics before and after each level, does not: its mean TTFT and TPOT
(engine-side, per token), and the decode rate clients / TPOT that the running batch kept while every client was
decoding, which is what `runtime bench --batch N` measures (it leaves out the prompts' prefill, which the
output tok/s includes).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Result:
    ttft: float  # seconds
    tpot: float | None  # seconds, None for a one-token answer
    tokens: int


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host != "localhost":
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
        raise SystemExit(f"{url}: this load script only talks to a server on this machine (127.0.0.1, localhost)")


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                last = time.perf_counter()
                first = first or last
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return Result(first - start, (last - first) / (tokens - 1) if tokens > 1 else None, tokens)


def server_sums(url: str, headers: dict) -> dict[str, float]:
    """The server's TTFT and TPOT histograms' sums and counts (seconds, choices)."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("trilite_time_to_first_token_seconds", "trilite_time_per_output_token_seconds"):
            key = "ttft" if "first" in family.name else "tpot"
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    out[f"{key}{sample.name[sample.name.rindex('_'):]}"] = sample.value
    return out


async def run_level(url: str, model: str, clients: int, requests: int, prompts: list[list[int]], max_tokens: int,
                    time_limit: float, headers: dict) -> dict:
    """``clients`` workers send ``requests`` requests in all, each worker one at a time; stops at the time limit."""
    results: list[Result] = []
    todo = iter(range(requests))
    deadline = time.perf_counter() + time_limit

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            if time.perf_counter() > deadline:
                return
            results.append(await one_request(client, model, prompts[i % len(prompts)], max_tokens))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=time_limit, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(clients))), time_limit + 30)
        wall = time.perf_counter() - start
    ttft = [r.ttft for r in results]
    tpot = [r.tpot for r in results if r.tpot is not None]
    row = {"clients": clients, "requests": len(results), "wall_s": wall,
           "output_tok_s": sum(r.tokens for r in results) / wall}
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}"] = percentile(xs, q) * 1000
    return row


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} ms"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None, help="default: the server's first model")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 x clients)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per level at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    args = ap.parse_args(argv)
    check_loopback(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    models = httpx.get(args.url + "/v1/models", headers=headers, timeout=30).json()["data"]
    model = args.model or models[0]["id"]
    vocab_hi = 256  # every byte-level or byte-fallback vocabulary has these ids; 0..2 are often special
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, vocab_hi) for _ in range(args.prompt_tokens)] for _ in range(64)]
    rows = []
    for clients in args.clients:
        n = args.requests or 2 * clients
        before = server_sums(args.url, headers)
        rows.append(asyncio.run(run_level(args.url, model, clients, n, prompts, args.max_tokens, args.time_limit,
                                          headers)))
        after = server_sums(args.url, headers)
        row = rows[-1]
        for key in ("ttft", "tpot"):
            count = after[f"{key}_count"] - before[f"{key}_count"]
            row[f"server_{key}_ms"] = 1000 * (after[f"{key}_sum"] - before[f"{key}_sum"]) / count if count else None
        row["server_decode_tok_s"] = clients / row["server_tpot_ms"] * 1000 if row["server_tpot_ms"] else None
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{clients:3d} clients  {row['requests']:4d} requests  {row['output_tok_s']:9.1f} tok/s  "
                  f"TTFT p50/p90/p99 {row['ttft_ms_p50']:.1f}/{row['ttft_ms_p90']:.1f}/{row['ttft_ms_p99']:.1f} ms  "
                  f"TPOT p50/p90/p99 {row['tpot_ms_p50']:.2f}/{row['tpot_ms_p90']:.2f}/{row['tpot_ms_p99']:.2f} ms  "
                  f"server: TTFT {_ms(row['server_ttft_ms'])}, TPOT {_ms(row['server_tpot_ms'])}, decode "
                  f"{row['server_decode_tok_s'] or 0:.1f} tok/s", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
