"""The compile pipeline: source -> trace -> passes -> memory plan -> configs -> AOT binaries -> artifact."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

from artifact_format import kernel_index as ki
from artifact_format.graph import Graph, Limits
from artifact_format.kernel_index import eval_grid
from artifact_format.layout import dump_json, target_dir
from compiler import artifact as art
from compiler.aot import Target, for_target
from compiler.autotune import autotune_variant, db_section, load_db, save_db
from compiler.emit import manifest_fields, write_files, write_reference
from compiler.kcache import BinaryCache
from compiler.lower import VariantSpec, node_variants, sampling_variant
from compiler.progress import Progress
from kernels.spec import USE_PDL, Config, Launch, Plan

DEFAULT_TARGETS = ("cuda:80", "cuda:90", "hip:gfx942")
DTYPES = ("fp32", "fp16", "bf16")


def local_target() -> Target | None:
    if not torch.cuda.is_available():
        return None
    if torch.version.hip:
        return Target("hip", torch.cuda.get_device_properties(0).gcnArchName.split(":")[0])
    major, minor = torch.cuda.get_device_capability(0)
    return Target("cuda", f"{major}{minor}")


def check_dtype(dtype: str, targets: list[Target]) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    old = [str(t) for t in targets if dtype == "bf16" and t.backend == "cuda" and int(t.arch) < 80]
    if old:
        raise ValueError(f"dtype bf16 needs cuda:80 or newer, not {', '.join(old)}: use --dtype fp16 or another target")


@dataclass
class BuildReport:
    out: Path
    nodes: int
    kernels: dict[str, int]  # target -> binaries
    compiled: int
    cached: int
    seconds: dict[str, float] = field(default_factory=dict)
    tuning_source: str = "heuristic"
    autotune_rows: list[tuple] = field(default_factory=list)
    notes: tuple[str, ...] = ()  # said in the compile output (e.g. GGUF tensors dequantized, not served natively)


def _concrete(shape: tuple, env: dict, limits: Limits, num_blocks: int) -> tuple[int, ...]:
    sizes = {**env, "S+1": env["S"] + 1, "NB": num_blocks}
    return tuple(sizes[d] if isinstance(d, str) else d for d in shape)


def _timing_env(v: VariantSpec) -> dict:
    """Step sizes a variant is timed at: its token bucket, spread over sequences as a step of that size would be."""
    T, max_S = v.meta_dict()["T_bucket"], v.meta_dict()["max_S"]
    S = T if v.step == "decode" or v.op == "sampling" else max(1, min(max_S, T // 64 or 1))
    return {"T": T, "S": S, "R": min(T, max_S) if v.op == "logits" else S}


def choose_configs(graph: Graph, variants: list[VariantSpec], limits: Limits, autotune: bool, bar: Progress
                   ) -> tuple[dict[VariantSpec, Config], dict, str, list[tuple]]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    db = load_db()
    section = db.get(db_section(gpu), {}) if gpu else {}
    chosen: dict[VariantSpec, Config] = {}
    decisions: dict = {}
    rows: list[tuple] = []
    source = "heuristic"
    by_key: dict[str, Config] = {}
    task = bar.add("choosing configs" + (" (autotune)" if autotune else ""), len(variants))
    for v in variants:
        key = v.tuning_key()
        if key not in by_key:
            meta = v.meta_dict()
            if autotune:
                env = _timing_env(v)
                blocks = env["S"] * limits.max_blocks + 1  # every timing sequence can hold max_seq_len tokens
                shapes = {role: _concrete(_role_shape(graph, v, role), env, limits, blocks) for role, _ in v.dtypes}
                config, timings = autotune_variant(v, shapes, env)
                decisions[key] = {"config": config.to_json(), "timings_us": timings}
                rows.append((v.op, meta["T_bucket"], key, config.to_json(), timings))
                source = "autotune"
            elif key in section and _plannable(v, Config.from_json(section[key])):
                config = Config.from_json(section[key])
                decisions[key] = {"config": config.to_json(), "from": "database"}
                source = "database" if source == "heuristic" else source
            else:
                config = v.spec.default(meta)
                decisions[key] = {"config": config.to_json(), "from": "heuristic"}
            by_key[key] = config
        chosen[v] = by_key[key]
        bar.advance(task)
    if autotune and gpu:
        db.setdefault(db_section(gpu), {}).update({k: d["config"] for k, d in decisions.items()})
        save_db(db)
    return chosen, {"gpu": gpu, "source": source, "decisions": decisions}, source, rows


_SAMPLING_SHAPES = {"logits": ("S", "V"), "out": ("S",)}


def _plannable(v: VariantSpec, config: Config) -> bool:
    """A database entry written for an older version of a kernel may no longer fit its spec: then it is ignored."""
    try:
        v.plan(config)
    except (KeyError, ValueError, TypeError):
        return False
    return True


def _role_shape(graph: Graph, v: VariantSpec, role: str) -> tuple:
    if v.op == "sampling":
        return tuple(v.meta_dict()["V"] if d == "V" else d for d in _SAMPLING_SHAPES.get(role, ("S",)))
    node = next(n for n in graph.nodes if n.name == v.node)
    return graph.tensor(node.input(role) or node.output(role)).shape


def index_variant(v: VariantSpec, plan: Plan, keys: list[str]) -> ki.Variant:
    launches = []
    for launch, key in zip(plan.launches, keys):
        params = tuple(ki.Param(name, dict(launch.signature)[name], *arg) for name, arg in launch.args)
        eval_grid(launch.grid, {"T": 1, "S": 1, "R": 1})  # a grid the runtime cannot evaluate fails here
        launches.append(ki.Launch(key, params, tuple(tuple(tuple(term) for term in dim) for dim in launch.grid)))
    return ki.Variant(v.step, v.max_T, {r: tuple(s) for r, s in plan.scratch}, tuple(launches))


def _compile_plan(plan: Plan, target: Target, cache: BinaryCache) -> tuple[list[tuple[str, bytes, dict, Launch]], bool]:
    """Each launch of the plan compiled for the target, and whether all of them fit its shared memory."""
    out = []
    for launch in plan.launches:
        launch = for_target(launch, target)
        try:
            key, binary, md = cache.get(launch, target)
        except Exception as e:  # ptxas / LLVM failures arrive as assorted exception types, many lines long
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"Triton could not compile {launch.kernel.fn.__name__} for {target} ({first}): "
                             f"try another --target, or rerun with --debug for the details") from e
        out.append((key, binary, md, launch))
    return out, all(md["shared"] <= target.max_shared for _, _, md, _ in out)


def compile_targets(variants: list[VariantSpec], chosen: dict, targets: list[Target], stage: Path, cache: BinaryCache,
                    bar: Progress) -> dict[str, int]:
    counts = {}
    plans = {v: v.plan(chosen[v]) for v in variants}
    task = bar.add("compiling kernels", len(targets) * sum(len(p.launches) for p in plans.values()))
    for target in targets:
        tdir = stage / target_dir(str(target))
        tdir.mkdir(parents=True)
        binaries: dict[str, ki.Binary] = {}
        nodes: list[ki.Entry] = []
        sampling: list[ki.Variant] = []
        for v in variants:
            config, plan = chosen[v], plans[v]
            compiled, fits = _compile_plan(plan, target, cache)
            # A config tuned on this machine's GPU (e.g. sm_90's 227 KB tiles) that a cross-compiled target cannot
            # hold: that target gets the same tiles with fewer pipeline stages (shared memory grows with them), and
            # failing that the op's default, which every target's shared memory holds.
            if not fits:
                tiles, warps = config.constexprs, config.num_warps
                fewer_stages = [Config(tiles, warps, s) for s in range(config.num_stages - 1, 0, -1)]
                for config in [*fewer_stages, v.spec.default(v.meta_dict())]:
                    plan = v.plan(config)
                    compiled, fits = _compile_plan(plan, target, cache)
                    if fits:
                        break
            if not fits:
                raise ValueError(f"{v.op} ({v.node}): its default config needs more shared memory than {target} "
                                 f"has ({target.max_shared} bytes): try another --target")
            keys = []
            for key, binary, md, launch in compiled:
                if key not in binaries:
                    (tdir / f"{key}.{target.binary_ext}").write_bytes(binary)
                    binaries[key] = ki.Binary(
                        file=f"{key}.{target.binary_ext}", source_hash=launch.kernel.cache_key,
                        config=config.to_json(), module=launch.kernel.fn.__module__,
                        kernel=launch.kernel.fn.__name__, constexprs=dict(launch.constexprs),
                        pdl=bool(dict(launch.constexprs).get(USE_PDL, False)), **md)
                keys.append(key)
            bar.advance(task, len(plans[v].launches))
            variant = index_variant(v, plan, keys)
            if v.op == "sampling":
                sampling.append(variant)
            elif nodes and nodes[-1].node == v.node:
                nodes[-1] = dataclasses.replace(nodes[-1], variants=(*nodes[-1].variants, variant))
            else:
                nodes.append(ki.Entry(v.node, v.op if not v.op.startswith("attention") else "attention", (variant,)))
        extra = {"sampling": ki.Entry("sampling", "sampling", tuple(sampling))} if sampling else {}
        index = ki.KernelIndex(str(target), triton.__version__, binaries, tuple(nodes), extra)
        (tdir / "index.json").write_bytes(dump_json(index.to_json()))
        counts[str(target)] = len(binaries)
    return counts


def build(source: str, out: Path | str, targets: list[str] | None = None, dtype: str | None = None,
          max_seq_len: int = 2048, max_batch: int = 32, max_num_tokens: int | None = None,
          autotune: bool | None = None, reference: bool = True, progress: bool = False,
          quant: str | None = None, group_size: int | None = None) -> BuildReport:
    """Compile ``source`` (preset name, HF directory or .gguf file) into an artifact directory at ``out``.

    quant "int8": weight-only int8 for every linear / rms_norm_linear weight (embedding and lm_head stay in ``dtype``);
    "int4": weight-only int4 per group of ``group_size`` (32, 64 or 128; default 128) along K, the same weights. The
    reference logits then come from transformers on the dequantized weights the artifact holds. "gguf" (a GGUF
    source only; not the default until its GPU tests pass): the same weights keep the GGUF's own quantized values,
    repacked (Q4_0 / Q4_1 / Q4_K to int4 per 32, Q5_K / Q8_0 to int8_group per 32, Q6_K per 16); any other type is
    dequantized, and a note says so."""
    from compiler.dequant import dequantized_checkpoint
    from compiler.frontends import family_of, load_source
    from compiler.memory import memory_plan
    from compiler.passes import optimize, passes_for
    from compiler.trace import trace
    from kernels.weight_quant import INT4_DEFAULT_GROUP_SIZE

    t0 = time.perf_counter()
    out = Path(out)
    art.check_output_dir(out)
    local = local_target()
    tgts = [Target.parse(t) for t in targets] if targets else ([local] if local else
                                                               [Target.parse(t) for t in DEFAULT_TARGETS])
    dtype = dtype or ("bf16" if local else "fp32")
    check_dtype(dtype, tgts)
    passes_for(quant or "none", group_size)  # an unknown scheme or a stray --group-size is one line before any work
    if quant == "int4":
        group_size = group_size or INT4_DEFAULT_GROUP_SIZE
    autotune = bool(local) if autotune is None else autotune
    if autotune and not local:
        raise ValueError("--autotune needs a GPU on this machine: drop it to use the tuning database or heuristics")
    seconds: dict[str, float] = {}
    if _is_random_preset(source):  # generated first, timed on its own: minutes for 8B on the CPU
        from compiler.frontends.presets import preset_dir

        preset_dir(source, progress)
        seconds["preset"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    src = load_source(source, progress=progress)  # before any progress output: a bad SOURCE is one clean line
    # gguf is opt-in: the CPU backends are exact on it, but its first GPU run (tests/gpu/test_gguf_gpu.py) failed.
    quant = quant or "none"
    if quant == "gguf" and not src.stored:
        raise ValueError(f"--quant gguf keeps a GGUF file's own quantized tensors, and {source} is not a .gguf file: "
                         f"use --quant none, int8 or int4")
    family = family_of(src.config)
    with Progress(progress) as bar:
        max_pos = src.config.get("max_position_embeddings") or max_seq_len
        max_seq_len = min(max_seq_len, max_pos)
        limits = Limits(max_seq_len=max_seq_len, max_batch=max_batch,
                        max_num_tokens=max_num_tokens or min(max_seq_len, 2048))
        tensors = read_tensors(src.tensors)
        seconds["load"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        task = bar.add("tracing and fusing", 2)
        graph, weights = trace(src.config, tensors, dtype, limits)
        del tensors
        bar.advance(task)
        seconds["trace"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        traced = weights
        graph, weights, transforms = optimize(graph, traced, dtype, quant, group_size, src.stored)
        if quant != "none" and reference:  # the reference model runs the dequantized weights: unwind them later
            row_counts = {n: t.shape[0] for n, t in traced.items() if t.dim()}
        del traced
        mem = memory_plan(graph, limits)
        bar.advance(task)
        seconds["passes"] = time.perf_counter() - t1

        variants = [v for node in graph.nodes for v in node_variants(graph, node, limits)]
        variants.append(sampling_variant(graph.get_meta("vocab_size"), limits))
        t2 = time.perf_counter()
        chosen, tuning, tuning_source, rows = choose_configs(graph, variants, limits, autotune, bar)
        seconds["autotune" if autotune else "configs"] = time.perf_counter() - t2

        stage = art.staging_dir(out)
        try:
            t3 = time.perf_counter()
            cache = BinaryCache()
            counts = compile_targets(variants, chosen, tgts, stage, cache, bar)
            seconds["compile"] = time.perf_counter() - t3
            t3 = time.perf_counter()
            known = write_files(stage, src, graph, weights, tuning)
            overrides = None
            if quant != "none" and reference:
                overrides = dequantized_checkpoint(transforms, weights, row_counts)
            del weights  # the reference model may need the memory
            seconds["write"] = time.perf_counter() - t3
            manifest = manifest_fields(source, src, family, dtype, tgts, limits, mem, transforms, quant,
                                       group_size)
            if reference:
                t4 = time.perf_counter()
                task = bar.add("reference logits (HF)", 1)
                manifest["reference"] = write_reference(stage, src, overrides)
                bar.advance(task)
                seconds["reference"] = time.perf_counter() - t4
            t4 = time.perf_counter()
            art.finish(stage, out, manifest, known)
            seconds["hash"] = time.perf_counter() - t4
        except BaseException:
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
            raise
    seconds["total"] = time.perf_counter() - t0
    return BuildReport(out, len(graph.nodes), counts, cache.misses, cache.hits, seconds, tuning_source, rows,
                       gguf_notes(transforms))


def gguf_notes(transforms: list[dict]) -> tuple[str, ...]:
    """One line per weight --quant gguf could not keep in its GGUF type (repack_gguf's gguf_dequantized records)."""
    from compiler.frontends.gguf_blocks import NATIVE_TYPES

    notes = []
    for r in transforms:
        if r["op"] == "gguf_dequantized":
            odd = [f"{src} is {t}" for src, t in r["gguf_types"].items() if t not in NATIVE_TYPES]
            notes.append(f"{r['inputs'][0]} dequantized to the build dtype, not served as GGUF blocks: "
                         f"{', '.join(odd) or 'a transform the blocks cannot follow'} (native types: "
                         f"{', '.join(NATIVE_TYPES)})")
    return tuple(notes)


def _is_random_preset(source: str) -> bool:
    """A random preset written as an HF directory first (not one compiled straight from its generator)."""
    from compiler.frontends.presets import PRESETS

    return source in PRESETS and PRESETS[source].random is not None and not PRESETS[source].random.direct


def read_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of a lazy mapping, read (and for GGUF dequantised) by threads: torch and numpy copy and
    convert without the GIL, so a big checkpoint comes off the page cache on every core."""
    from artifact_format.layout import workers

    names = list(tensors)
    with ThreadPoolExecutor(workers()) as pool:
        return dict(zip(names, pool.map(tensors.__getitem__, names)))
