"""`compiler compile SOURCE --out DIR ...` and `compiler models`.

Every failure is one ``error: ...`` line and a non-zero exit (runtime/cli_errors.py, shared with the runtime's
CLI); ``compiler --debug ...`` or TRILITE_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from runtime.cli_errors import OneLineGroup, debug_option


@click.group(cls=OneLineGroup)
@debug_option
def main(debug: bool) -> None:
    """trilite compiler: model -> static graph -> fused graph -> AOT kernel binaries -> artifact."""


@main.command()
@click.argument("source")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Artifact directory (default: artifacts/NAME).")
@click.option("--target", "targets", multiple=True,
              help="GPU target, repeatable: cuda:80, cuda:90, hip:gfx942 ... (default: this GPU, else those three).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Weight and activation dtype (default: bf16 with a GPU, fp32 without).")
@click.option("--max-seq-len", type=int, default=2048, show_default=True)
@click.option("--max-batch", type=int, default=32, show_default=True)
@click.option("--max-num-tokens", type=int, default=None,
              help="Most tokens in one prefill step (default: min(max-seq-len, 2048)).")
@click.option("--autotune/--no-autotune", default=None,
              help="Time candidate configs on this GPU (default: on with a GPU).")
@click.option("--reference/--no-reference", default=True, help="Store HF transformers reference logits.")
@click.option("--quant", default=None,
              help="Weight quantization: none, int8 (weight-only, symmetric per output channel), int4 (weight-only, "
                   "asymmetric per group along K, see --group-size) or gguf (a .gguf source's own quantized tensors, "
                   "served as they are: Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0; other types dequantized, with a note) for "
                   "every linear (qkv, o, gate_up, down), the MoE experts (int8 / int4: each expert's gate_up and "
                   "down matrices, dequantized in-kernel) and the embedding table and lm_head (per vocabulary row / "
                   "per group along the hidden size; a tied table once). MoE routers stay in --dtype. Norm weights "
                   "stay in --dtype and are applied to x in the kernel, not folded into the quantized weights. "
                   "Default: none (gguf is exact on the CPU backends; the cuda and hip backends refuse gguf "
                   "artifacts until its GPU tests pass); int8 / int4 of a GGUF source dequantize it first, then "
                   "quantize.")
@click.option("--group-size", type=int, default=None,
              help="--quant int4 only: values per (scale, min) group along K, 32, 64 or 128 (default 128).")
def compile(source: str, out: Path | None, targets: tuple[str, ...], dtype: str | None, max_seq_len: int,
            max_batch: int, max_num_tokens: int | None, autotune: bool | None, reference: bool, quant: str | None,
            group_size: int | None) -> None:
    """Compile SOURCE (a preset name, an HF model directory or a .gguf file) into an artifact."""
    from compiler.build import build

    out = out or Path("artifacts") / Path(source).stem
    report = build(source, out, list(targets) or None, dtype, max_seq_len, max_batch, max_num_tokens, autotune,
                   reference, progress=True, quant=quant, group_size=group_size)
    console = Console()
    for note in report.notes:
        console.print(f"note: {note}")
    if report.autotune_rows:
        table = Table(title="autotune (median µs per config, CUDA graphs)")
        for col in ("op", "T bucket", "best config", "best µs", "candidates"):
            table.add_column(col)
        for op, bucket, _key, config, timings in report.autotune_rows:
            best = min((t for t in timings.values() if t == t), default=float("nan"))
            table.add_row(op, str(bucket), _short(config), f"{best:.1f}", str(len(timings)))
        console.print(table)
    size = sum(p.stat().st_size for p in report.out.rglob("*") if p.is_file())
    kernels = ", ".join(f"{t}: {n}" for t, n in report.kernels.items())
    times = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    console.print(f"[bold]{report.out}[/bold]: {report.nodes} graph nodes; binaries {kernels} "
                  f"({report.compiled} compiled, {report.cached} from cache); configs from {report.tuning_source}; "
                  f"{size / 2**20:.1f} MiB; {times}")


def _short(config: dict) -> str:
    cx = " ".join(f"{k}={v}" for k, v in config["constexprs"].items())
    return f"{cx} w{config['num_warps']} s{config['num_stages']}"


@main.command()
def models() -> None:
    """List the presets and the supported architectures."""
    from compiler.frontends import SUPPORTED_ARCHITECTURES, list_presets

    table = Table(title="presets")
    table.add_column("name")
    table.add_column("what")
    for name, what in list_presets().items():
        table.add_row(name, what)
    console = Console()
    console.print(table)
    console.print("architectures: " + ", ".join(f"{a} ({f})" for a, f in SUPPORTED_ARCHITECTURES.items()))
    console.print("sources: a preset name, an HF model directory (config.json, *.safetensors, tokenizer.json) "
                  "or a .gguf file")
    console.print("--quant: none, int8 (weight-only, per output channel), int4 (weight-only, per group of "
                  "--group-size 32/64/128 along K) or gguf (a .gguf source's Q4_0 / Q4_1 / Q4_K / "
                  "Q5_K / Q6_K / Q8_0 tensors served as they are, other types dequantized) for the linears, the "
                  "embedding table and the lm_head; int8 / int4 also for the MoE experts (each expert's gate_up and "
                  "down matrices); MoE routers (and a shared expert's gate), norm weights and biases stay in the "
                  "build dtype")


if __name__ == "__main__":
    main()
