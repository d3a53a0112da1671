"""Every op of the kernel pack against plain torch, at decode and prefill shapes, bf16.

    PYTHONPATH=. python benchmarks/kernels.py [--out kernels.md] [--ops linear,logits] [--hidden 4096]

Before timing, each kernel runs on fresh random inputs with its output poisoned (NaN) and is compared with
the op's reference; the max error is printed and kept in the table ("!" marks one out of tolerance).
Times are medians of triton.testing.do_bench, which flushes L2 before every call, so weight-streaming decode
ops pay for their memory traffic as in a whole model, whose weights never stay in L2. Kernels are timed by
replaying the plans their launcher ran (kernels.spec.run on the launcher's plan and tensors), which keeps the
launcher's shape checks out of the time. GB/s: the bytes an op must move (inputs read, outputs written;
attention_decode: the K and V it reads) over the trilite time. --smoke runs tiny shapes through the Triton
interpreter on the CPU (fp16, perf_counter times): a check of this script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Run as a script, this file's folder comes first on sys.path, and this file's name would shadow the package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
import kernels.spec as spec  # noqa: E402

EPS = 1e-5
OPS = ("rms_norm", "add_rms_norm", "rms_norm_linear", "linear", "rope", "silu_mul", "embedding", "logits",
       "attention_decode", "attention_prefill", "kv_cache_write", "sampling")


@dataclass(frozen=True)
class Model:
    H: int  # hidden
    I: int  # intermediate
    Hq: int
    Hk: int
    Dh: int
    V: int

    @property
    def qkv(self) -> int:
        return (self.Hq + 2 * self.Hk) * self.Dh


MODELS = {2048: Model(2048, 5632, 32, 4, 64, 32000), 4096: Model(4096, 14336, 32, 8, 128, 128256)}
SMOKE = Model(64, 96, 4, 2, 16, 100)


@dataclass
class Row:
    op: str
    shape: str
    torch_us: float
    trilite_us: float
    err: str
    nbytes: int

    def cells(self) -> list[str]:
        gbps = f"{self.nbytes / (self.trilite_us * 1e3):.0f}" if self.nbytes else ""
        return [self.op, self.shape, f"{self.torch_us:.1f}", f"{self.trilite_us:.1f}",
                f"{self.torch_us / self.trilite_us:.2f}x", gbps, self.err]


class Bench:
    """Shapes, inputs and timer of one run: GPU bf16 with do_bench, or --smoke on the CPU."""

    def __init__(self, args: argparse.Namespace):
        self.smoke, self.rep = args.smoke, args.rep
        self.device = "cpu" if args.smoke else "cuda"
        self.dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
        self.gen = torch.Generator(device=self.device).manual_seed(0)
        self.decode = (1, 5) if args.smoke else (1, 16, 64)
        self.tokens = self.decode + ((24,) if args.smoke else (512, 4096))
        self.context = 40 if args.smoke else 4096
        self.batches = (1, 2) if args.smoke else (1, 16, 32, 64)
        self.prefill_seqs = ((2, 12),) if args.smoke else ((1, 512), (8, 512), (1, 4096))

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen, device=self.device) * scale).to(dtype or self.dtype)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.gen, device=self.device, dtype=torch.int32)

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen, device=self.device).to(torch.int32)

    def full(self, n: int, value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((n,), value, dtype=dtype, device=self.device)

    def nan(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype or self.dtype, device=self.device)

    def time_us(self, fn: Callable[[], object]) -> float:
        if self.smoke:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e6
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(5, self.rep // 4), rep=self.rep, return_mode="median") * 1e3


def launch(module, launcher: Callable, *args, **kwargs) -> tuple[object, Callable[[], object]]:
    """Run a launcher once; return (its result, a thunk replaying the plans it ran, on the same tensors).

    Keywords the launcher does not take (out= where it allocates its own output) are dropped.
    """
    params = inspect.signature(launcher).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    captured, real = [], spec.run

    def spy(plan, tensors, env, interpret=None):
        tensors = dict(tensors)
        device = next(iter(tensors.values())).device
        for role, (numel, dt) in plan.scratch:  # allocated once here rather than on every replay
            tensors.setdefault(role, torch.empty(numel, dtype=spec.DTYPE_NAMES[dt], device=device))
        captured.append((plan, tensors, env))
        real(plan, tensors, env, interpret)

    patched = [m for m in (module, spec) if getattr(m, "run", None) is real]
    for m in patched:
        m.run = spy
    try:
        result = launcher(*args, **kwargs)
    finally:
        for m in patched:
            m.run = real
    if not captured:
        return result, lambda: launcher(*args, **kwargs)
    return result, lambda: [real(p, t, e) for p, t, e in captured]


def max_err(out, ref) -> float:
    pairs = zip(out, ref) if isinstance(out, tuple) else [(out, ref)]
    return max((o.float() - r.float()).abs().max().item() for o, r in pairs)


def size(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


@dataclass
class Case:
    """One measurement: the kernel replay, the torch expression, the error vs the reference, bytes moved."""

    shape: str
    trilite: Callable[[], object]
    torch_fn: Callable[[], object]
    err: float
    scale: float  # max |reference|: the tolerance is relative to it
    nbytes: int
    tol: float = 2e-2


def rms_norm_case(b: Bench, m: Model, mods: dict, T: int) -> Case:
    mod, x, w = mods["rms_norm"], b.randn(T, m.H), 1 + b.randn(m.H, scale=0.1)
    out, fn = launch(mod, mod.rms_norm, x, w, eps=EPS, out=b.nan(T, m.H))
    ref = mod.reference(x, w, eps=EPS)
    return Case(f"T={T} D={m.H}", fn, lambda: rms(x, w), max_err(out, ref), ref.abs().max().item(), size(x, w, out))


def add_rms_norm_case(b: Bench, m: Model, mods: dict, T: int) -> Case:
    mod, x, r, w = mods["add_rms_norm"], b.randn(T, m.H), b.randn(T, m.H), 1 + b.randn(m.H, scale=0.1)
    out, fn = launch(mod, mod.add_rms_norm, x, r, w, eps=EPS, out=b.nan(T, m.H), residual_out=b.nan(T, m.H))
    ref = mod.reference(x, r, w, eps=EPS)
    return Case(f"T={T} D={m.H}", fn, lambda: rms(x + r, w), max_err(out, ref), ref[0].abs().max().item(),
                size(x, r, w, *out))


def projections(b: Bench, m: Model) -> list[tuple[int, str, int]]:
    return [(T, name, N) for T in b.tokens for name, N in (("qkv", m.qkv), ("gate_up", 2 * m.I))]


def _norm_linear_inputs(b: Bench, m: Model, T: int, N: int):
    x, g, w = b.randn(T, m.H), 1 + b.randn(m.H, scale=0.1), b.randn(N, m.H, scale=m.H**-0.5)
    return x, g, w, (w.float() * g.float()).to(b.dtype)  # the last: what the compiler stores, W diag(g)


def rms_norm_linear_case(b: Bench, m: Model, mods: dict, T: int, name: str, N: int) -> Case:
    mod, (x, g, w, folded) = mods["rms_norm_linear"], _norm_linear_inputs(b, m, T, N)
    out, fn = launch(mod, mod.rms_norm_linear, x, folded, eps=EPS, out=b.nan(T, N))
    ref = mod.reference(x, folded, eps=EPS)
    return Case(f"{name} T={T} {m.H}->{N}", fn, lambda: F.linear(rms(x, g), w), max_err(out, ref),
                ref.abs().max().item(), size(x, w, out))


def unfused_case(b: Bench, m: Model, mods: dict, T: int, name: str, N: int) -> Case:
    """The RMSNorm kernel, then the linear kernel on its output: what rms_norm_linear saves."""
    x, g, w, _ = _norm_linear_inputs(b, m, T, N)
    h, norm = launch(mods["rms_norm"], mods["rms_norm"].rms_norm, x, g, eps=EPS)
    out, lin = launch(mods["linear"], mods["linear"].linear, h, w, out=b.nan(T, N))
    ref = F.linear(rms(x.float(), g.float()), w.float())
    return Case(f"{name} T={T} {m.H}->{N}", lambda: (norm(), lin()), lambda: F.linear(rms(x, g), w),
                max_err(out, ref), ref.abs().max().item(), size(x, w, out) + 2 * size(h))


def linear_case(b: Bench, m: Model, mods: dict, T: int, name: str, K: int) -> Case:
    mod, x, w, r = mods["linear"], b.randn(T, K, scale=K**-0.5), b.randn(m.H, K), b.randn(T, m.H)
    out, fn = launch(mod, mod.linear, x, w, None, r, out=b.nan(T, m.H))
    ref = mod.reference(x, w, None, r)
    return Case(f"{name} T={T} {K}->{m.H}", fn, lambda: torch.addmm(r, x, w.t()), max_err(out, ref),
                ref.abs().max().item(), size(x, w, r, out))


def silu_mul_case(b: Bench, m: Model, mods: dict, T: int) -> Case:
    mod, x = mods["silu_mul"], b.randn(T, 2 * m.I)
    out, fn = launch(mod, mod.silu_mul, x, out=b.nan(T, m.I))
    ref = mod.reference(x)
    return Case(f"T={T} I={m.I}", fn, lambda: F.silu(x[:, :m.I]) * x[:, m.I:], max_err(out, ref),
                ref.abs().max().item(), size(x, out))


def rope_case(b: Bench, m: Model, mods: dict, T: int) -> Case:
    mod, qkv, max_pos = mods["rope"], b.randn(T, m.qkv), 4096
    inv_freq = 10000.0 ** (-torch.arange(0, m.Dh, 2, device=b.device).float() / m.Dh)
    angles = torch.arange(max_pos, device=b.device).float()[:, None] * inv_freq[None, :]
    cos_sin, pos = torch.cat([angles.cos(), angles.sin()], 1).contiguous(), b.randint(max_pos, T)
    attrs = dict(num_q_heads=m.Hq, num_kv_heads=m.Hk, head_dim=m.Dh, rotary_dim=m.Dh, is_neox=True)
    mine, theirs = qkv.clone(), qkv.clone()  # in place: the kernel and the reference each get a copy
    _, fn = launch(mod, mod.rope, mine, pos, cos_sin, **attrs)
    ref = mod.reference(theirs, pos, cos_sin, **attrs)
    qk = T * (m.Hq + m.Hk) * m.Dh * qkv.element_size()
    return Case(f"T={T} {m.Hq}+{m.Hk}x{m.Dh}", fn, lambda: mod.reference(theirs, pos, cos_sin, **attrs),
                max_err(mine, ref), ref.abs().max().item(), 2 * qk + T * m.Dh * 4)


def embedding_case(b: Bench, m: Model, mods: dict, T: int) -> Case:
    mod, weight, ids = mods["embedding"], b.randn(m.V, m.H), b.randint(m.V, T)
    out, fn = launch(mod, mod.embedding, ids, weight, out=b.nan(T, m.H))
    ids64 = ids.long()
    return Case(f"T={T} {m.V}x{m.H}", fn, lambda: F.embedding(ids64, weight),
                max_err(out, mod.reference(ids, weight)), 1.0, 2 * size(out))


def kv_cache_write_case(b: Bench, m: Model, mods: dict, T: int) -> Case:
    mod, qkv, bs = mods["kv_cache_write"], b.randn(T, m.qkv), 16
    blocks = -(-T // bs) + 4
    slots = b.perm(blocks * bs)[:T]
    mine, theirs = [[torch.zeros(blocks, bs, m.Hk, m.Dh, dtype=b.dtype, device=b.device) for _ in "kv"]
                    for _ in "ab"]
    attrs = dict(num_q_heads=m.Hq, num_kv_heads=m.Hk, head_dim=m.Dh)
    _, fn = launch(mod, mod.kv_cache_write, qkv, slots, *mine, block_size=bs, **attrs)
    mod.reference(qkv, slots, *theirs, **attrs)
    k_at, v_at, rows = m.Hq * m.Dh, (m.Hq + m.Hk) * m.Dh, slots.long()

    def index_put():
        theirs[0].view(-1, m.Hk, m.Dh)[rows] = qkv[:, k_at:v_at].view(-1, m.Hk, m.Dh)
        theirs[1].view(-1, m.Hk, m.Dh)[rows] = qkv[:, v_at:].view(-1, m.Hk, m.Dh)

    return Case(f"T={T} {m.Hk}x{m.Dh}", fn, index_put, max_err(tuple(mine), tuple(theirs)), 1.0,
                4 * T * m.Hk * m.Dh * qkv.element_size())


def sequences(b: Bench, T: int) -> int:
    """Sequences whose last tokens a step of T tokens samples: T at decode, 512-token prompts at prefill."""
    return T if T in b.decode else max(1, T // 512)


def logits_case(b: Bench, m: Model, mods: dict, T: int) -> Case:
    mod, S = mods["logits"], sequences(b, T)
    x, g, weight = b.randn(T, m.H), 1 + b.randn(m.H, scale=0.1), b.randn(m.V, m.H, scale=m.H**-0.5)
    last = b.perm(T)[:S]
    out, fn = launch(mod, mod.logits, x, g, weight, last, eps=EPS, out=b.nan(S, m.V, dtype=torch.float32))
    ref, rows = mod.reference(x, g, weight, last, eps=EPS), last.long()
    # From 2 rows up the tensor-core path rounds the normed rows to bf16 (as torch's F.linear does): bf16 tolerance.
    return Case(f"S={S} T={T} {m.H}->{m.V}", fn, lambda: F.linear(rms(x[rows], g), weight).float(),
                max_err(out, ref), ref.abs().max().item(), size(weight) + S * m.V * 4)


def torch_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The usual torch sampler (HF / vLLM's torch path): sort, top-k and top-p masks, multinomial."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    drop = (sorted_p.cumsum(-1) - sorted_p > top_p) | (torch.arange(probs.shape[-1], device=probs.device) >= top_k)
    return idx.gather(1, torch.multinomial(sorted_p.masked_fill(drop, 0.0), 1))


def sampling_case(b: Bench, m: Model, mods: dict, T: int) -> Case:
    """Checked greedy (must be argmax exactly: err = mismatching rows), timed at t=0.8, top-k 50, top-p 0.9."""
    mod, S = mods["sampling"], sequences(b, T)
    logits, f32, i32 = b.randn(S, m.V, scale=3.0, dtype=torch.float32), torch.float32, torch.int32
    seeds = (b.full(S, 7, torch.int64), b.full(S, 0, torch.int64))
    greedy = (b.full(S, 0.0, f32), b.full(S, 0, i32), b.full(S, 1.0, f32), b.full(S, 0.0, f32))
    out, _ = launch(mod, mod.sampling, logits, *greedy, *seeds, out=b.full(S, -1, i32))
    wrong = float((out.long() != logits.argmax(-1)).sum().item())
    sample = (b.full(S, 0.8, f32), b.full(S, 50, i32), b.full(S, 0.9, f32), b.full(S, 0.0, f32))
    _, fn = launch(mod, mod.sampling, logits, *sample, *seeds)
    return Case(f"S={S} V={m.V} t=.8 k=50 p=.9", fn, lambda: torch_sample(logits, 0.8, 50, 0.9), wrong, 1.0,
                size(logits), tol=0.0)


def paged(b: Bench, m: Model, S: int, L: int, bs: int = 16):
    """Caches holding S sequences of L tokens at shuffled blocks, their block tables and lengths."""
    per_seq = -(-L // bs)
    k, v = b.randn(S * per_seq, bs, m.Hk, m.Dh), b.randn(S * per_seq, bs, m.Hk, m.Dh)
    return k, v, b.perm(S * per_seq).view(S, per_seq).contiguous(), b.full(S, L, torch.int32)


def attention_attrs(m: Model) -> dict:
    return dict(num_q_heads=m.Hq, num_kv_heads=m.Hk, head_dim=m.Dh, block_size=16, scale=m.Dh**-0.5)


def attention_decode_case(b: Bench, m: Model, mods: dict, S: int) -> Case:
    mod, L, attrs = mods["attention_decode"], b.context, attention_attrs(m)
    qkv, (k, v, tables, lens) = b.randn(S, m.qkv), paged(b, m, S, L)
    out, fn = launch(mod, mod.attention_decode, qkv, k, v, lens, tables, **attrs, out=b.nan(S, m.Hq * m.Dh))
    ref = mod.reference(qkv, k, v, lens, tables, **{key: a for key, a in attrs.items() if key != "block_size"})
    rows = tables.long()

    def gather_sdpa():  # torch's paged attention: gather the blocks, then SDPA
        kk, vv = (c[rows].view(S, -1, m.Hk, m.Dh)[:, :L].transpose(1, 2) for c in (k, v))
        q = qkv[:, :m.Hq * m.Dh].view(S, m.Hq, 1, m.Dh)
        return F.scaled_dot_product_attention(q, kk, vv, scale=attrs["scale"], enable_gqa=True)

    return Case(f"S={S} ctx={L} {m.Hq}/{m.Hk}x{m.Dh}", fn, gather_sdpa, max_err(out, ref), ref.abs().max().item(),
                2 * S * L * m.Hk * m.Dh * qkv.element_size())


def attention_prefill_case(b: Bench, m: Model, mods: dict, S: int, L: int) -> Case:
    mod, attrs = mods["attention_prefill"], attention_attrs(m)
    qkv, (k, v, tables, lens) = b.randn(S * L, m.qkv), paged(b, m, S, L)
    q, kd, vd = qkv.view(S, L, -1).split([m.Hq * m.Dh, m.Hk * m.Dh, m.Hk * m.Dh], -1)
    pos = torch.arange(L, device=b.device)
    slots = (tables.long()[:, pos // 16] * 16 + pos % 16).view(-1)  # the cache already holds this step's k/v
    k.view(-1, m.Hk, m.Dh)[slots] = kd.reshape(-1, m.Hk, m.Dh)
    v.view(-1, m.Hk, m.Dh)[slots] = vd.reshape(-1, m.Hk, m.Dh)
    cu = torch.arange(S + 1, dtype=torch.int32, device=b.device) * L
    out, fn = launch(mod, mod.attention_prefill, qkv, k, v, cu, lens, tables, **attrs, out=b.nan(S * L, m.Hq * m.Dh))
    ref = mod.reference(qkv, k, v, cu, lens, tables, **{key: a for key, a in attrs.items() if key != "block_size"})

    def sdpa():  # torch from the dense qkv of the step, no cache
        heads = [t.reshape(S, L, -1, m.Dh).transpose(1, 2) for t in (q, kd, vd)]
        return F.scaled_dot_product_attention(*heads, is_causal=True, scale=attrs["scale"], enable_gqa=True)

    return Case(f"{S}x{L} {m.Hq}/{m.Hk}x{m.Dh}", fn, sdpa, max_err(out, ref), ref.abs().max().item(),
                size(qkv) + S * L * m.Hq * m.Dh * qkv.element_size())


# (row label, modules it needs, case, its parameter tuples)
TABLE = [
    ("rms_norm", ("rms_norm",), rms_norm_case, lambda b, m: [(T,) for T in b.tokens]),
    ("add_rms_norm", ("add_rms_norm",), add_rms_norm_case, lambda b, m: [(T,) for T in b.tokens]),
    ("rms_norm_linear", ("rms_norm_linear",), rms_norm_linear_case, projections),
    ("rms_norm+linear", ("rms_norm", "linear"), unfused_case, projections),
    ("linear", ("linear",), linear_case,
     lambda b, m: [(T, name, K) for T in b.tokens for name, K in (("o+res", m.Hq * m.Dh), ("down+res", m.I))]),
    ("rope", ("rope",), rope_case, lambda b, m: [(T,) for T in b.tokens]),
    ("silu_mul", ("silu_mul",), silu_mul_case, lambda b, m: [(T,) for T in b.tokens]),
    ("embedding", ("embedding",), embedding_case, lambda b, m: [(T,) for T in b.tokens]),
    ("logits", ("logits",), logits_case, lambda b, m: [(T,) for T in b.tokens]),
    ("attention_decode", ("attention_decode",), attention_decode_case, lambda b, m: [(S,) for S in b.batches]),
    ("attention_prefill", ("attention_prefill",), attention_prefill_case, lambda b, m: b.prefill_seqs),
    ("kv_cache_write", ("kv_cache_write",), kv_cache_write_case, lambda b, m: [(T,) for T in b.tokens]),
    ("sampling", ("sampling",), sampling_case, lambda b, m: [(T,) for T in b.tokens]),
]


def run_table(b: Bench, models: list[Model], mods: dict) -> list[Row]:
    rows = []
    for m in models:
        print(f"{m}")
        for label, needs, case_fn, params in TABLE:
            if not all(n in mods for n in needs):
                continue
            for p in params(b, m):
                try:
                    case = case_fn(b, m, mods, *p)
                    bad = not case.err <= case.tol * max(case.scale, 1.0)
                    print(f"  {label:<17} {case.shape:<30} max err {case.err:.3g}"
                          f"{'  <-- OUT OF TOLERANCE' if bad else ''}", flush=True)
                    rows.append(Row(label, case.shape, b.time_us(case.torch_fn), b.time_us(case.trilite),
                                    f"{case.err:.2g}{'!' if bad else ''}", case.nbytes))
                except Exception as e:  # one broken case must not hide the other numbers
                    print(f"  {label:<17} {p}: {type(e).__name__}: {e}", flush=True)
                finally:
                    if not b.smoke:
                        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (default: all)")
    p.add_argument("--hidden", default="2048,4096", help="hidden sizes: 2048 (intermediate 5632), 4096 (14336)")
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time per measurement, ms")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no GPU: run this on a GPU machine, or pass --smoke to check the script on the CPU")
    b = Bench(args)
    mods = {}
    for name in args.ops.split(","):
        try:
            mods[name] = importlib.import_module(f"kernels.{name}")
        except ModuleNotFoundError as e:
            print(f"note: skipping {name}: {e}")
    models = [SMOKE] if b.smoke else [MODELS[int(h)] for h in args.hidden.split(",")]
    rows = run_table(b, models, mods)
    device = "the CPU interpreter (smoke)" if b.smoke else torch.cuda.get_device_name()
    header = ["op", "shape", "torch µs", "trilite µs", "speedup", "GB/s", "max err"]
    lines = [f"Kernels vs torch on {device}, {str(b.dtype).removeprefix('torch.')}: do_bench medians with L2 "
             "flushed; GB/s = bytes the op must move / trilite time.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
