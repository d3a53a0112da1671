"""``runtime run | serve | verify | inspect | bench``: thin click commands over functions tests call directly.

Every failure ends a command with one ``error: ...`` line on stderr and a non-zero exit (runtime/cli_errors.py);
``runtime --debug ...`` or TRILITE_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.backends import NAMES
from runtime.cli_errors import OneLineGroup, debug_option


@click.group(cls=OneLineGroup)
@debug_option
def main(debug: bool) -> None:
    """trilite runtime: run, serve, verify, inspect and benchmark compiled artifacts."""


_artifact = click.argument("artifact", type=click.Path(path_type=Path))
_backend = click.option("--backend", type=click.Choice(NAMES), default="auto", show_default=True,
                        help="auto: the GPU when the artifact has kernels for it, else torch on the CPU")
_kv = click.option("--kv-cache-gb", type=float, default=None, help="KV-cache size (default: from free memory)")
_prefix = click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
                       help="reuse the KV blocks of a prompt prefix an earlier request computed")
_mixed = click.option("--mixed-steps/--no-mixed-steps", default=True, show_default=True,
                      help="running sequences keep decoding in the steps that prefill a new prompt (chunked "
                           "prefill); --no-mixed-steps: a step is all prefill or all decode")
_budget = click.option("--max-num-batched-tokens", type=int, default=None,
                       help="tokens one step may carry, 1 to the artifact's max_num_tokens (default: that)")


def chat_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user message in the artifact's chat template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)


def _check_utf8(text: str) -> None:
    """Python hands bytes that are not UTF-8 in argv over as lone surrogates; the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the prompt (or a --stop string) is not valid UTF-8: pass UTF-8 text, e.g. set a UTF-8 "
                         "locale such as LANG=C.UTF-8 in the shell that produces it") from None


@main.command()
@_artifact
@click.option("--prompt", required=True, help="text to continue (or the user message with --chat)")
@click.option("--chat", is_flag=True, help="apply the artifact's chat template to the prompt")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: off")
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="stop string (repeatable); not printed")
@_backend
@_kv
@_prefix
@_mixed
@_budget
def run(artifact: Path, prompt: str, chat: bool, max_tokens: int, temperature: float, top_p: float, top_k: int,
        min_p: float, repetition_penalty: float, seed: int | None, stop: tuple[str, ...], backend: str,
        kv_cache_gb: float | None, prefix_cache: bool, mixed_steps: bool, max_num_batched_tokens: int | None) -> None:
    """Generate from ARTIFACT, streaming text to stdout as tokens come."""
    from runtime.engine import load
    from runtime.sampling import SamplingParams

    for text in (prompt, *stop):
        _check_utf8(text)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, stop=list(stop))
    engine = load(artifact, backend=backend, kv_cache_gb=kv_cache_gb, prefix_cache=prefix_cache,
                  mixed_steps=mixed_steps, max_num_batched_tokens=max_num_batched_tokens)
    source = chat_prompt(engine.tokenizer, prompt) if chat else prompt
    for piece in engine.stream(source, params):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()


@main.command()
@_artifact
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
@click.option("--max-queue", type=int, default=256, show_default=True,
              help="sequences that may wait for a place in the batch; more get 503 at once")
@click.option("--served-model-name", default=None, help="the model name clients send (default: the artifact's folder)")
@click.option("--async-decode/--no-async-decode", default=True, show_default=True,
              help="enqueue each step before reading the previous one's tokens (off: read every step first)")
@_backend
@_kv
@_prefix
@_mixed
@_budget
def serve(artifact: Path, host: str, port: int, api_key: str | None, max_queue: int, served_model_name: str | None,
          async_decode: bool, backend: str, kv_cache_gb: float | None, prefix_cache: bool, mixed_steps: bool,
          max_num_batched_tokens: int | None) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (chat and text completions, streaming)."""
    from runtime.serving.server import serve as run_server

    run_server(artifact, host=host, port=port, api_key=api_key, backend=backend, kv_cache_gb=kv_cache_gb,
               max_queue=max_queue, served_model_name=served_model_name, async_decode=async_decode,
               prefix_cache=prefix_cache, mixed_steps=mixed_steps, max_num_batched_tokens=max_num_batched_tokens)


@main.command()
@_artifact
@_backend
@_kv
def verify(artifact: Path, backend: str, kv_cache_gb: float | None) -> None:
    """Check ARTIFACT's logits for its reference prompt against reference.safetensors."""
    from runtime.verify import verify as run_verify

    result = run_verify(artifact, backend=backend, kv_cache_gb=kv_cache_gb)
    for line in result.lines():
        click.echo(line)
    if not result.passed:
        sys.exit(1)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command()
@_artifact
def inspect(artifact: Path) -> None:
    """Summarise ARTIFACT: model, limits, graph ops, kernels per target, weights."""
    from rich.console import Console
    from rich.table import Table

    from runtime.artifact import describe, load_artifact

    d = describe(load_artifact(artifact, check_hashes=False))
    console = Console(soft_wrap=True)  # one fact per line, however narrow the terminal: tests and greps read them
    m = d["model"]
    console.print(f"[bold]{d['name']}[/]  format {d['format']}  {m['architecture']} ({m['family']}), {m['dtype']}, "
                  f"source {m['source']}")
    console.print("build   " + ", ".join(f"{k} {v}" for k, v in sorted(d["build"].items())))
    console.print("limits  " + ", ".join(f"{k} {v}" for k, v in sorted(d["limits"].items())))
    g = d["graph"]
    console.print(f"graph   {g['nodes']} nodes, {g['layers']} layers, vocab {g['vocab_size']}: "
                  + ", ".join(f"{op} ×{n}" for op, n in g["ops"].items()))
    w = d["weights"]
    console.print(f"weights {w['tensors']} tensors, {w['parameters'] / 1e6:.2f} M parameters, {_size(w['bytes'])}; "
                  f"quant {w['quant']} (matmuls: " + ", ".join(f"{s} ×{n}" for s, n in w["schemes"].items())
                  + "".join(f", {op} {s}" for op, s in w["tables"].items())
                  + f"); {_size(w['decode_bytes'])} of weights read per decode step")
    if w["gguf"]:
        console.print("gguf    " + ", ".join(f"{k} ×{n}" for k, n in sorted(w["gguf"].items())))
    table = Table("target", "binaries", "launch sites", "size")
    for target, k in d["kernels"].items():
        table.add_row(target, str(k["binaries"]), str(k["launch sites"]), _size(k["bytes"]))
    console.print(table)


@main.command()
@_artifact
@click.option("--pp", type=int, default=512, show_default=True, help="prompt tokens of the prefill test")
@click.option("--tg", type=int, default=128, show_default=True, help="tokens of the generation test")
@click.option("--batch", type=int, multiple=True, default=(1, 16), show_default=True,
              help="batch sizes of the generation test (repeatable)")
@_backend
@_kv
@_prefix
@_budget
def bench(artifact: Path, pp: int, tg: int, batch: tuple[int, ...], backend: str, kv_cache_gb: float | None,
          prefix_cache: bool, max_num_batched_tokens: int | None) -> None:
    """Measure prompt processing and generation speed on ARTIFACT (a llama-bench-like table).

    Its steps go straight to the backend, past the scheduler: no test reuses a prefix, with the cache on or off, and
    none mixes; the prompt is prefilled in chunks of --max-num-batched-tokens."""
    from rich.console import Console

    from runtime.bench import run_bench
    from runtime.engine import load

    engine = load(artifact, backend=backend, kv_cache_gb=kv_cache_gb, prefix_cache=prefix_cache,
                  max_num_batched_tokens=max_num_batched_tokens)
    rows = run_bench(engine, pp=pp, tg=tg, batch_sizes=batch)
    Console(width=160).print(bench_table(rows))


_BENCH_HEADERS = {"test": "test", "batch": "batch", "tokens_per_s": "tokens/s", "ms_per_token": "ms/token",
                  "gb_per_s": "GB/s", "pct_copy_bw": "% of copy BW", "copy_gb_per_s": "copy GB/s",
                  "graph_capture_s": "graph capture s", "first_token_s": "start to first token s"}


def bench_table(rows: list[dict]):
    """rich Table of run_bench rows (dicts with the same keys); None shows as "-"."""
    from rich.table import Table

    table = Table(*(_BENCH_HEADERS.get(k, k) for k in (rows[0] if rows else ["test"])))
    for row in rows:
        table.add_row(*["-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()])
    return table

if __name__ == "__main__":
    main()
