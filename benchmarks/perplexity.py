"""Perplexity of artifacts on real English text: how much a quantized build loses against its unquantized one.

    python -m benchmarks.perplexity artifacts/smollm2-135m artifacts/smollm2-135m-int8 [--text FILE]
        [--tokens 4096] [--window 512] [--backend auto|torch|interpret|cuda] [--out results.md]

The text is tokenized once, with the first artifact's tokenizer (every artifact must have the same vocabulary), cut
to ``--tokens`` tokens and into non-overlapping windows of ``--window`` tokens; each window is one sequence through
``Engine.logits`` (chunked prefill over the paged KV cache), and every token after a window's first is scored by the
logits of the position before it: perplexity = exp(mean negative log-likelihood) over those tokens, the same token
positions for every artifact. Without ``--text`` the text is the Python language reference that ships with the
standard library (``pydoc_data.topics``: English prose, on every machine that has Python).
"""

from __future__ import annotations

import math
import platform
import sys
from pathlib import Path

import click
import torch


def default_text() -> tuple[str, str]:
    """(text, where it came from): the stdlib's Python reference topics, in their sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), f"pydoc_data.topics of Python {platform.python_version()}"


def windows(ids: list[int], tokens: int, window: int) -> list[list[int]]:
    ids = ids[:tokens]
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def nll(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(ids[i + 1] | ids[:i + 1]) over the window and the number of scored tokens."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = torch.tensor(ids[1:], dtype=torch.long)
    return float(-logp.gather(1, target[:, None]).sum()), len(ids) - 1


def perplexity(path: str, chunks: list[list[int]], backend: str) -> tuple[float, dict]:
    from runtime.engine import load

    eng = load(path, backend=backend)
    try:
        total, count = 0.0, 0
        for chunk in chunks:
            s, n = nll(torch.from_numpy(eng.logits(chunk)), chunk)  # Engine.logits: numpy fp32
            total, count = total + s, count + n
        manifest = eng.artifact.manifest
        return math.exp(total / count), {"dtype": manifest["model"].get("dtype", "?"),
                                         "quant": manifest["model"].get("quant", "none"), "scored": count}
    finally:
        close = getattr(eng.backend, "close", None)
        if close:
            close()


@click.command()
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="UTF-8 text file (default: the Python reference from the standard library)")
@click.option("--tokens", default=4096, show_default=True, help="tokens of the text to score")
@click.option("--window", default=512, show_default=True, help="tokens per sequence (at most max_seq_len)")
@click.option("--backend", default="auto", show_default=True)
@click.option("--out", default=None, help="append the table to this file")
def main(artifacts: tuple[str, ...], text_path: str | None, tokens: int, window: int, backend: str,
         out: str | None) -> None:
    from runtime.artifact import load_artifact
    from runtime.engine import artifact_tokenizer

    if window < 2 or tokens < 2:
        raise click.BadParameter("needs at least 2 tokens", param_hint="--window/--tokens")
    text, source = (Path(text_path).read_text(encoding="utf-8"), text_path) if text_path else default_text()
    tok = artifact_tokenizer(load_artifact(artifacts[0]))
    ids = tok.encode(text)
    if len(ids) < tokens:
        raise click.UsageError(f"the text has {len(ids)} tokens, fewer than --tokens {tokens}: pass a longer --text")
    chunks = windows(ids, tokens, window)
    rows, first = [], None
    for path in artifacts:
        ppl, info = perplexity(path, chunks, backend)
        first = first or ppl
        rows.append(f"| {Path(path).name} | {info['dtype']} | {info['quant']} | {info['scored']} | {ppl:.4f} | "
                    f"{100 * (ppl / first - 1):+.2f}% |")
        print(rows[-1], file=sys.stderr)
    table = "\n".join([f"Text: {source}, first {tokens} tokens, windows of {window} ({len(chunks)} sequences), "
                       f"backend {backend}.", "",
                       "| artifact | dtype | quant | scored tokens | perplexity | vs first |",
                       "|---|---|---|---|---|---|", *rows])
    print(table)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
