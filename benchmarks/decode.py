"""Decode speed through the public API, against the bandwidth floor and HF transformers, on the GPU.

    PYTHONPATH=. python -m benchmarks.decode artifacts/tinyllama-1.1b [artifacts/llama3-8b ...]
        [--batch 1,16,32] [--hf/--no-hf] [--profile/--no-profile] [--modes plain,pdl,async,pdl+async] [--out decode.md]

Protocol (issue 8): `runtime.load(...).generate()`, a 128-token prompt per sequence then 256 new tokens, greedy,
ignore_eos; decode rate = batch * 255 / (t(256) - t(1)), each length timed after a warm-up run of it. The floor
is the weight bytes one decode step reads (every weight but the embedding table) plus the KV bytes it reads
(the prompt and half the generated tokens, on average), over a device-to-device copy measured in this process.
Each row also gives the rate the whole step moves weights and KV at (GB/s, % of copy bandwidth) and, for an MoE
model, the expert bytes a step reads: batch 1, top_k of each layer's E experts; batch b, the expected distinct
experts of b independently and uniformly routed tokens, E (1 - (1 - top_k / E)^b) (runtime.bench.expert_bytes; the
routing actually chosen is not read back from the device, and real routers are less uniform). With --profile,
torch.profiler (CUPTI sees the driver's launches inside the replayed graphs) times each kernel
over 64 decode steps at batch 1: calls per step, µs, GB/s (weight bytes of the matmuls over their time) and
the kernel time against the step time. HF transformers (static cache + torch.compile, its documented fast
path) runs on the same random weights at batch 1 in the same process (--hf).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import click
import torch

import runtime
from runtime.bench import (
    copy_bandwidth,
    decode_weight_bytes,
    expert_bytes,
    kv_bytes_per_token,
    node_weight_bytes,
    weight_bytes_by_op,
)

PROMPT, NEW = 128, 256


def _prompts(vocab: int, batch: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (PROMPT,), generator=g).tolist() for _ in range(batch)]


def _timed_generate(engine, prompts: list[list[int]], n: int) -> float:
    params = runtime.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    engine.generate(prompts, params)  # warm-up of this length
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    torch.cuda.synchronize()
    assert all(len(o.token_ids) == n for o in outs), "a sequence stopped early despite ignore_eos"
    return time.perf_counter() - t


def decode_rate(engine, vocab: int, batch: int) -> float:
    prompts = _prompts(vocab, batch, seed=batch)
    return batch * (NEW - 1) / (_timed_generate(engine, prompts, NEW) - _timed_generate(engine, prompts, 1))


def step_bytes(weight_bytes: int, kv_per_token: int, batch: int) -> float:
    """Bytes a decode step reads: its weights once, each row its KV (the prompt and half the new tokens)."""
    return weight_bytes + batch * (PROMPT + NEW / 2) * kv_per_token


def floor_tok_s(weight_bytes: int, kv_per_token: int, batch: int, bw: float) -> float:
    """Tokens per second if a step only moved its bytes at copy bandwidth."""
    return batch * bw / step_bytes(weight_bytes, kv_per_token, batch)


def role_profile(engine, kernels: list[tuple[str, float, float]]) -> list[tuple[str, int, float, float, int]]:
    """Per role of a decode step's launches (qkv_proj, o_proj, attention, ..., the last part of the node's name):
    (role, launches per step, µs per step of kernel time, µs per step from the launch's start to the next
    launch's start, weight bytes per step). ``kernels``: the profile's kernels in start order (name, start µs,
    duration µs); the batch-1 decode steps are found as runs of the program's decode launch sequence. With PDL a
    kernel starts before the previous one ends and waits: the start-to-start time is what the launch costs."""
    graph = engine.artifact.graph
    seq = engine.backend.program.launches("decode", {"T": 1, "S": 1, "R": 1})
    names = [b.binary.kernel for b in seq]
    node_of = {n.name: n for n in graph.nodes}
    wbytes = {b.node: node_weight_bytes(graph, node_of[b.node]) if b.node in node_of else 0 for b in seq}
    agg: dict[str, list] = {}
    steps, i, got = 0, 0, [k[0] for k in kernels]
    while i + len(names) <= len(kernels):
        if got[i:i + len(names)] != names:
            i += 1
            continue
        steps += 1
        for j, b in enumerate(seq):
            _, start, dur = kernels[i + j]
            nxt = kernels[i + j + 1][1] if i + j + 1 < len(kernels) else start + dur
            role = b.node.rsplit(".", 1)[-1] + ("" if b.binary.kernel.endswith(("linear_kernel", "logits_kernel"))
                                                 else f" ({b.binary.kernel.strip('_')})")
            r = agg.setdefault(role, [0, 0.0, 0.0, 0, set()])
            r[0] += 1
            r[1] += dur
            r[2] += nxt - start
            if b.node not in r[4]:  # a node's weights count once per step, however many launches it has
                r[4].add(b.node)
                r[3] += wbytes[b.node]
        i += len(names)
    if not steps:
        return []
    return [(role, r[0] // steps, r[1] / steps, r[2] / steps, r[3]) for role, r in agg.items()]


def moe_reads(graph, roles: list[tuple[str, int, float, float, int]], bw: float) -> list[str]:
    """The batch-1 expert reads' achieved bandwidth: the bytes the moe nodes read per step (router and the top_k
    experts of each layer, node_weight_bytes) over the start-to-start time of all their launches (router, gate_up,
    down) per step; role_profile counts a node's bytes under each of its roles, so they are summed here once."""
    nodes = [n for n in graph.nodes if n.op == "moe"]
    span = sum(r[3] for r in roles if r[0].startswith(tuple(f"{n.name.rsplit('.', 1)[-1]} (" for n in nodes)))
    if not nodes or not span:
        return []
    nbytes = sum(node_weight_bytes(graph, n) for n in nodes)
    return ["", f"MoE expert reads at batch 1: {nbytes / 1e9:.3f} GB per step (router + top_k of E experts per "
            f"layer) in {span:.1f} µs of moe launches (start to start): {nbytes / span / 1e3:.0f} GB/s, "
            f"{100 * nbytes / (span * 1e-6) / bw:.0f}% of copy bandwidth"]


def kernel_profile(engine, vocab: int, steps: int = 64) -> tuple[list[tuple[str, int, float]], float, list]:
    """(kernel name, calls, total µs) over ``steps`` decode steps at batch 1, the steps' wall time (µs), and
    role_profile's rows for those steps."""
    from torch.profiler import ProfilerActivity, profile

    prompts = _prompts(vocab, 1, seed=7)
    params = runtime.SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    engine.generate(prompts, params)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e6
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    timeline = []
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
            agg[ev.name][0] += 1
            agg[ev.name][1] += ev.device_time_total
            if ev.name.endswith("_kernel"):
                timeline.append((ev.name, ev.time_range.start, ev.device_time_total))
    timeline.sort(key=lambda k: k[1])
    rows = sorted(((k, int(v[0]), v[1]) for k, v in agg.items()), key=lambda r: -r[2])
    try:
        roles = role_profile(engine, timeline)
    except Exception as e:  # the breakdown is extra: the kernel table above still stands
        print(f"per-role breakdown failed: {type(e).__name__}: {e}", flush=True)
        roles = []
    return rows, wall, roles


def _is_random_preset(source: str) -> bool:
    """A random preset HF transformers can load: one written as an HF directory (a direct one, compiled straight
    from its generator, has none, and writing it would take the disk the artifact needs)."""
    from compiler.frontends.presets import PRESETS

    return source in PRESETS and PRESETS[source].random is not None and not PRESETS[source].random.direct


def hf_rate(preset: str) -> float | None:
    from transformers import AutoModelForCausalLM

    from benchmarks.hf_baseline import decode_tok_s
    from compiler.frontends.presets import preset_dir

    model = AutoModelForCausalLM.from_pretrained(preset_dir(preset, progress=False), dtype=torch.bfloat16)
    model = model.cuda().eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, PROMPT), device="cuda")
    kw = {"cache_implementation": "static"}
    model.generate(prompt, max_new_tokens=4, do_sample=False, **kw)
    rate = decode_tok_s(model, prompt, NEW, **kw)
    del model
    torch.cuda.empty_cache()
    return rate


MODES = ("plain", "pdl", "async", "pdl+async")


@click.command()
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--batch", default="1,16,32", show_default=True)
@click.option("--hf/--no-hf", default=True, show_default=True)
@click.option("--profile/--no-profile", "do_profile", default=True, show_default=True)
@click.option("--modes", default="pdl+async", show_default=True,
              help=f"comma-separated launch modes, each timed on its own engine: {', '.join(MODES)} "
                   "(pdl: the PDL-built binaries with programmatic dependent launch, else launched plainly; async: "
                   "async_decode=True; the runtime's default is pdl+async)")
@click.option("--out", default=None, help="also write the tables here (markdown)")
def main(artifacts: tuple[str, ...], batch: str, hf: bool, do_profile: bool, modes: str, out: str | None) -> None:
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    if bad := [m for m in chosen if m not in MODES]:
        raise click.BadParameter(f"unknown mode(s) {bad}: choose from {', '.join(MODES)}", param_hint="--modes")
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name()
    lines = [f"{name}, bf16, copy bandwidth {bw / 1e9:.0f} GB/s (read + written); prompt {PROMPT}, {NEW} new tokens, "
             f"greedy, ignore_eos", "",
             "| model | batch | tok/s | ms/step | % of floor | floor tok/s | HF static+compile tok/s | launch "
             "| GB/s moved | % of copy | expert GB/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for path in artifacts:
        model = Path(path).name
        hf_tok = None
        for k, mode in enumerate(chosen):
            engine = runtime.load(path, backend="cuda", pdl="pdl" in mode, async_decode="async" in mode)
            manifest = engine.artifact.manifest
            vocab = manifest["model"]["config"]["vocab_size"]
            graph = engine.artifact.graph
            kv_tok = kv_bytes_per_token(graph, engine.artifact.limits.block_size)
            # HF loads the very same weights only for a random preset (written as an HF directory). A preset's
            # name ("tinyllama-1.1b") is no path: look it up, never guess from its suffix.
            source = manifest["model"]["source"]
            if k == 0 and hf and _is_random_preset(source):
                hf_tok = hf_rate(source)
            for b in (int(x) for x in batch.split(",")):
                rate = decode_rate(engine, vocab, b)
                weights = decode_weight_bytes(graph, b)
                floor = floor_tok_s(weights, kv_tok, b, bw)
                hf_cell = f"{hf_tok:.1f}" if (hf_tok and b == 1) else "–"
                moved = step_bytes(weights, kv_tok, b) * rate / b  # bytes per second: a step's bytes per step time
                experts = expert_bytes(graph, b)[0]
                expert_cell = f"{experts / 1e9:.2f}" if experts else "–"
                line = (f"| {model} | {b} | {rate:.1f} | {1000 * b / rate:.3f} | {100 * rate / floor:.0f}% "
                        f"| {floor:.0f} | {hf_cell} | {mode} | {moved / 1e9:.0f} | {100 * moved / bw:.0f}% "
                        f"| {expert_cell} |")
                lines.append(line)
                print(line, flush=True)
            if do_profile and k == 0:
                rows, wall, roles = kernel_profile(engine, vocab)
                steps = 65
                total = sum(r[2] for r in rows)
                details += ["", f"{model}, batch 1, {mode}, kernels over {steps} decode steps: {total / steps:.1f} µs "
                            f"of kernel time per step, {wall / steps:.1f} µs wall per step", "",
                            "| kernel | calls/step | µs/step | share | weight GB/s | % of copy |",
                            "|---|---|---|---|---|---|"]
                by_op = weight_bytes_by_op(graph)
                for kname, calls, us in rows[:14]:
                    share = 100 * us / total
                    # Triton names a kernel after its jit function: _<op>_kernel reads that op's weights.
                    # Only the matmuls read their whole weight each step (rope reads a row of its tables).
                    op = kname.removeprefix("_").removesuffix("_kernel")
                    wb = by_op.get(op, 0) if op in ("linear", "rms_norm_linear", "logits") else 0
                    per_s = wb / (us / steps * 1e-6)  # bytes per second while the kernel runs
                    rate = f"{per_s / 1e9:.0f} | {100 * per_s / bw:.0f}%" if wb else "– | –"
                    details.append(f"| {kname[:60]} | {calls / steps:.1f} | {us / steps:.1f} | {share:.1f}% | {rate} |")
                if roles:
                    details += ["", "Per role of the decode step (every layer's launches of it together; start to "
                                "start: from a launch's start to the next one's, what the launch costs the step):", "",
                                "| role | launches/step | kernel µs/step | start-to-start µs/step | weight GB/s "
                                "(start to start) | % of copy |", "|---|---|---|---|---|---|"]
                    for role, n, us, span, wb in sorted(roles, key=lambda r: -r[3]):
                        rate = f"{wb / span / 1e3:.0f} | {100 * wb / (span * 1e-6) / bw:.0f}%" if wb else "– | –"
                        details.append(f"| {role} | {n} | {us:.1f} | {span:.1f} | {rate} |")
                    details += moe_reads(graph, roles, bw)
            engine.close()  # the next mode loads the artifact again: its GPU memory first
            torch.cuda.empty_cache()
    text = "\n".join(lines + details) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
