"""Token sampling from logits: greedy, temperature, top-k, top-p, min-p; one program per row.

Semantics (shared with ``reference`` and ``filtered_probs``): temperature 0 → argmax, ties to the
lowest index. Otherwise p = softmax(logits / T); top_k keeps every token with p ≥ the k-th largest p
(ties at the boundary kept, as vLLM); top_p then keeps the smallest prefix of the k-kept tokens, by
descending p, whose mass reaches top_p of their mass (boundary ties kept); min_p then keeps p ≥
min_p · max p. The token is drawn from the renormalised kept set.

A row has up to ~150k entries, so it is streamed in BLOCK_V chunks and never sorted. Every filter
is a threshold on s = (x − max)/T ≤ 0 (p ∝ exp(s)). The top-k and top-p thresholds are the largest
t whose count / mass of {s ≥ t} reaches the target, found by bisection over the integer key
bits(+inf) − bits(|s|), which orders s ≤ 0 exactly like s does: at most 31 passes and exact, with
no value resolution lost. Each pass also moves both bounds onto the smallest and largest s present
in the half it keeps, so the search stops as soon as the bracket holds one distinct value — after
far fewer passes when the boundary sits among few tokens, as it does for peaked distributions.
Filters that are off cost nothing: pure temperature sampling is two passes (max with an online
softmax denominator, then the draw). The draw is an inverse CDF over the kept set with a single
uniform from ``tl.rand(seed, offset)``: one Philox call per row, where Gumbel-max needs one per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import enter
from kernels.spec import Config, KernelSpec, Plan, dtype_name, grid_dim, make_launch, ptr, run

_INF_BITS = tl.constexpr(0x7F800000)  # bits of +inf; key(s) = _INF_BITS − bits(|s|), key(0) = _INF_BITS


@triton.jit
def _key_to_s(t):
    """The s ≤ 0 whose key is t, for 0 ≤ t ≤ _INF_BITS: {key ≥ t} = {s ≥ _key_to_s(t)}."""
    return -((-t + _INF_BITS).to(tl.float32, bitcast=True))


@triton.jit
def _s_to_key(s):
    return -tl.abs(s).to(tl.int32, bitcast=True) + _INF_BITS


@triton.jit
def _scaled(row_ptr, start, m, inv_t, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """Chunk of s = (x − max)/T ≤ 0; columns past V read NaN, which every comparison rejects."""
    cols = start + tl.arange(0, BLOCK_V)
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("nan")).to(tl.float32)
    return cols, (x - m) * inv_t


@triton.jit
def _mass(row_ptr, m, inv_t, s_t, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """Σ exp(s) over s ≥ s_t (unnormalised: the row maximum contributes 1)."""
    total = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        _, s = _scaled(row_ptr, start, m, inv_t, V, BLOCK_V)
        total += tl.where(s >= s_t, tl.exp(s), 0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _threshold(row_ptr, m, inv_t, lo, s_lo, target, BY_MASS: tl.constexpr, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """Largest key t with measure({key ≥ t}) ≥ target (measure = count or mass) and its s.

    ``lo`` (s ``s_lo``) must reach the target. Invariant: lo reaches it, hi does not, and every token
    with lo ≤ key < hi has s_lo ≤ s ≤ s_top. Each pass strictly shrinks [lo, hi) to at most half, so
    it ends within 31 passes; it ends earlier once [lo, hi) holds a single distinct key.
    """
    hi = lo * 0 + (_INF_BITS + 1)
    s_top = float("inf")
    while hi - lo > 1:
        mid = lo + ((hi - lo) >> 1)
        s_mid = _key_to_s(mid)
        # Per-lane partials, reduced once per pass rather than once per chunk.
        measure = tl.zeros([BLOCK_V], tl.float32)
        lo_min = tl.full([BLOCK_V], float("inf"), tl.float32)
        lo_max = tl.full([BLOCK_V], -float("inf"), tl.float32)
        up_min = tl.full([BLOCK_V], float("inf"), tl.float32)
        up_max = tl.full([BLOCK_V], -float("inf"), tl.float32)
        for start in range(0, V, BLOCK_V):
            _, s = _scaled(row_ptr, start, m, inv_t, V, BLOCK_V)
            up = s >= s_mid
            if BY_MASS:
                measure += tl.where(up, tl.exp(s), 0.0)
            else:
                measure += up.to(tl.float32)
            in_lo = (s >= s_lo) & (s < s_mid)
            in_up = up & (s <= s_top)
            lo_min = tl.minimum(lo_min, tl.where(in_lo, s, float("inf")))
            lo_max = tl.maximum(lo_max, tl.where(in_lo, s, -float("inf")))
            up_min = tl.minimum(up_min, tl.where(in_up, s, float("inf")))
            up_max = tl.maximum(up_max, tl.where(in_up, s, -float("inf")))
        measure = tl.sum(measure, axis=0)
        lo_min = tl.min(lo_min, axis=0)
        lo_max = tl.max(lo_max, axis=0)
        up_min = tl.min(up_min, axis=0)
        up_max = tl.max(up_max, axis=0)
        # A half with no token (min > max) can only come from rounding; the bare bisection step still progresses.
        if measure >= target:
            # Keep the upper half: {key ≥ mid} = {s ≥ up_min}. An exact hit settles the set at once.
            found = up_min <= up_max
            lo = tl.where(found, _s_to_key(up_min), mid)
            s_lo = tl.where(found, up_min, s_mid)
            hi = tl.where(measure == target, lo + 1, tl.where(found, _s_to_key(up_max) + 1, hi))
            s_top = tl.where(found, up_max, s_top)
        else:
            found = lo_min <= lo_max
            hi = tl.where(found, _s_to_key(lo_max) + 1, mid)
            s_top = tl.where(found, lo_max, s_mid)
            lo = tl.where(found, _s_to_key(lo_min), lo)
            s_lo = tl.where(found, lo_min, s_lo)
    return lo, s_lo


@triton.jit
def _draw(row_ptr, m, inv_t, s_t, target, fallback, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """First kept token whose running mass exceeds ``target`` (inverse CDF), else the last kept one.

    The fallback only covers rounding: ``target`` = u·mass with u < 1, but that mass was summed in
    another order than the running cumsum here.
    """
    run_mass = 0.0
    tok = fallback * 0 + V
    last = fallback
    for start in range(0, V, BLOCK_V):
        cols, s = _scaled(row_ptr, start, m, inv_t, V, BLOCK_V)
        q = tl.where(s >= s_t, tl.exp(s), 0.0)
        c = tl.cumsum(q, axis=0) + run_mass
        tok = tl.minimum(tok, tl.min(tl.where((c > target) & (q > 0.0), cols, V), axis=0))
        last = tl.maximum(last, tl.max(tl.where(q > 0.0, cols, -1), axis=0))
        run_mass = tl.max(c, axis=0)
    return tl.where(tok < V, tok, last)


@triton.jit
def _sampling_kernel(
    logits_ptr,  # [S, V]
    temperature_ptr,  # [S] fp32, 0 = greedy
    top_k_ptr,  # [S] i32, 0 = off
    top_p_ptr,  # [S] fp32, 1 = off
    min_p_ptr,  # [S] fp32, 0 = off
    seeds_ptr,  # [S] i64
    offsets_ptr,  # [S] i64
    out_ptr,  # [S] i32
    V: tl.constexpr,
    BLOCK_V: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # kernels/pdl.py; last with a default, so older indexes run interpreted
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * V
    temperature = tl.load(temperature_ptr + row)
    inv_t = 1.0 / tl.where(temperature > 0.0, temperature, 1.0)
    # Pass 1: row maximum, its first index (torch.argmax's tie rule: chunks ascend, ties keep the earlier)
    # and the softmax denominator Σ exp(s), rescaled whenever the maximum grows (online softmax).
    m = -float("inf")
    arg = 0
    total = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        chunk_max = tl.max(x, axis=0)
        chunk_arg = tl.min(tl.where(x == chunk_max, cols, V), axis=0)
        arg = tl.where(chunk_max > m, chunk_arg, arg)
        m_new = tl.maximum(m, chunk_max)
        # x == m_new spares exp(−inf − −inf) = NaN while the maximum is still −inf; such terms are
        # scaled by exp(−inf) = 0 once a finite maximum arrives (an all −inf row keeps no token anyway).
        terms = tl.where(x == m_new, 1.0, tl.exp((x - m_new) * inv_t))
        total = total * tl.where(m_new > m, tl.exp((m - m_new) * inv_t), 1.0) + tl.sum(terms, axis=0)
        m = m_new
    tok = arg
    if temperature > 0.0:
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        min_p = tl.minimum(tl.load(min_p_ptr + row), 1.0)
        t = arg * 0  # key 0 = s of −inf: keeps every token
        s_t = -float("inf")
        if (top_k > 0) & (top_k < V):
            t, s_t = _threshold(row_ptr, m, inv_t, t, s_t, top_k.to(tl.float32), False, V, BLOCK_V)
        if top_p < 1.0:
            kept = total
            if t > 0:
                kept = _mass(row_ptr, m, inv_t, s_t, V, BLOCK_V)
            t, s_t = _threshold(row_ptr, m, inv_t, t, s_t, top_p * kept, True, V, BLOCK_V)
        # min_p keeps p ≥ min_p·p_max ⇔ s ≥ log(min_p), since s = log(p / p_max).
        s_t = tl.maximum(s_t, tl.where(min_p > 0.0, tl.log(tl.maximum(min_p, 1e-30)), -float("inf")))
        if s_t > -float("inf"):
            total = _mass(row_ptr, m, inv_t, s_t, V, BLOCK_V)
        u = tl.rand(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))
        tok = _draw(row_ptr, m, inv_t, s_t, u * total, arg, V, BLOCK_V)
    tl.store(out_ptr + row, tok.to(tl.int32))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def configs(meta: dict) -> list[Config]:
    cap = triton.next_power_of_2(meta["V"])
    return [Config.make(num_warps=_warps(b), num_stages=1, BLOCK_V=b) for b in (1024, 4096) if b <= cap] or [
        default(meta)]


def default(meta: dict) -> Config:
    # A row is streamed many times (one pass per bisection step): wide chunks keep many loads in flight.
    block = min(max(triton.next_power_of_2(meta["V"]), 16), 4096)
    return Config.make(num_warps=_warps(block), num_stages=1, BLOCK_V=block)


def plan(meta: dict, dtypes: dict, config: Config) -> Plan:
    roles = ("logits", "temperature", "top_k", "top_p", "min_p", "seeds", "offsets", "out")
    launch = make_launch(
        _sampling_kernel,
        types={f"{r}_ptr": ptr(dtypes[r]) for r in roles},
        constexprs={"V": meta["V"], "BLOCK_V": config["BLOCK_V"], "USE_PDL": False},
        args={f"{r}_ptr": ("tensor", r) for r in roles},
        grid=[grid_dim(("S", 1, 1))],
        config=config,
    )
    return Plan((launch,))


SPEC = KernelSpec("sampling", configs, default, plan)


def sampling(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
             min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None,
             config: Config | None = None) -> torch.Tensor:
    """logits [S, V] (fp32), temperature/top_p/min_p [S] fp32, top_k [S] i32, seeds/offsets [S] i64 -> [S] i32."""
    S, V = logits.shape
    assert logits.is_contiguous(), "logits must be a contiguous [S, V]"
    for name, t, dt in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int32),
                        ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32),
                        ("seeds", seeds, torch.int64), ("offsets", offsets, torch.int64)):
        assert t.shape == (S,) and t.dtype == dt, f"{name} must be [S] {dt}, got {tuple(t.shape)} {t.dtype}"
    out = torch.empty(S, dtype=torch.int32, device=logits.device) if out is None else out
    tensors = {"logits": logits, "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
               "seeds": seeds, "offsets": offsets, "out": out}
    meta = {"V": V, "max_T": S, "max_S": S}
    dtypes = {role: dtype_name(t) for role, t in tensors.items()}
    run(plan(meta, dtypes, config or default(meta)), tensors, {"T": S, "S": S})
    return out


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    """The distribution each row samples from, [S, V] fp32: renormalised over the kept set, one-hot if greedy.

    Written with a full sort, independently of the kernel's bisection.
    """
    x = logits.float()
    S, V = x.shape
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    probs = torch.softmax(x / t[:, None], dim=-1)
    desc = probs.sort(dim=-1, descending=True).values
    k = top_k.long()
    k = torch.where((k > 0) & (k < V), k, torch.full_like(k, V))
    keep = probs >= desc.gather(1, (k - 1)[:, None])
    in_k = desc >= desc.gather(1, (k - 1)[:, None])
    cum = torch.where(in_k, desc, torch.zeros_like(desc)).cumsum(dim=-1)
    # First sorted position whose cumulative mass reaches top_p of the k-kept mass.
    first = (cum < top_p.float()[:, None] * cum[:, -1:]).sum(dim=-1).clamp(max=V - 1)
    keep_p = probs >= desc.gather(1, first[:, None])
    keep &= keep_p | (top_p >= 1)[:, None]
    keep &= probs >= min_p.float()[:, None] * desc[:, :1]
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    kept = kept / kept.sum(dim=-1, keepdim=True)
    one_hot = torch.nn.functional.one_hot(x.argmax(dim=-1), V).float()
    return torch.where(greedy[:, None], one_hot, kept)


def reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              min_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[S] i32 tokens drawn from ``filtered_probs`` with a torch.Generator seeded from (seed, offset).

    Same distribution as the kernel, different random stream; greedy rows give torch.argmax exactly.
    """
    probs = filtered_probs(logits, temperature, top_k, top_p, min_p)
    out = torch.empty(probs.shape[0], dtype=torch.int32, device=logits.device)
    for i, (seed, offset) in enumerate(zip(seeds.tolist(), offsets.tolist())):
        gen = torch.Generator(device=logits.device).manual_seed((seed * 1_000_003 + offset) % (1 << 63))
        out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return out
