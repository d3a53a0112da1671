"""HF transformers decode speed on the same random-weight model: the baseline trilite's decode is compared with.

Batch 1, bf16, a 128-token prompt then 256 new tokens, greedy; eager and with static cache + torch.compile.
Run on the GPU machine, in the same call as `runtime bench`, so both numbers come from one card:

    PYTHONPATH=. python -m benchmarks.hf_baseline tinyllama-1.1b [--compile/--no-compile]
"""

from __future__ import annotations

import time

import click
import torch


def decode_tok_s(model, prompt: torch.Tensor, new_tokens: int, **generate_kw) -> float:
    """Tokens per second of the decode phase: (time(prompt + N) - time(prompt + 1)) / (N - 1), each timed after
    a warm-up call of the same length (a static cache is sized by the length, so a new length recompiles)."""

    def timed(n: int) -> float:
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **generate_kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **generate_kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    first = timed(1)
    full = timed(new_tokens)
    return (new_tokens - 1) / (full - first)


@click.command()
@click.argument("preset")
@click.option("--prompt-len", default=128, show_default=True)
@click.option("--new-tokens", default=256, show_default=True)
@click.option("--compile/--no-compile", "use_compile", default=True, show_default=True)
def main(preset: str, prompt_len: int, new_tokens: int, use_compile: bool) -> None:
    from transformers import AutoModelForCausalLM

    from compiler.frontends.presets import preset_dir

    path = preset_dir(preset, progress=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len), device="cuda")
    eager = decode_tok_s(model, prompt, new_tokens)
    print(f"| HF transformers eager | {preset} | bf16 | batch 1 | {eager:.1f} tok/s |", flush=True)
    if use_compile:
        # transformers compiles the forward itself (mode reduce-overhead, CUDA graphs) when generating with a
        # static cache: that is its documented fast path, so it is the baseline we hold ourselves to.
        t = time.perf_counter()
        kw = {"cache_implementation": "static"}
        model.generate(prompt, max_new_tokens=4, do_sample=False, **kw)
        model.generate(prompt, max_new_tokens=4, do_sample=False, **kw)
        warm = time.perf_counter() - t
        compiled = decode_tok_s(model, prompt, new_tokens, **kw)
        print(f"| HF transformers static cache + torch.compile | {preset} | bf16 | batch 1 | {compiled:.1f} tok/s "
              f"| warm-up {warm:.0f} s |", flush=True)

if __name__ == "__main__":
    main()
