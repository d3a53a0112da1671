"""Per-request sampling settings, the repetition penalty, stop conditions, and the sampling op's inputs.

Names, defaults and meanings follow vLLM's ``SamplingParams``. No triton or kernels import: the
runtime's GPU path needs neither, and the ``sampling`` op itself runs wherever the backend runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Below this temperature a request is greedy, as in vLLM: logits / 1e-5 would only amplify rounding noise.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 is greedy; top_k 0 (or −1) and top_p 1 and min_p 0 switch those filters off; stop
    strings are cut from the output text; seed None lets the engine pick one per request.
    """

    max_tokens: int | None = 16  # None: until the sequence reaches the artifact's max_seq_len
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so the params stay hashable and immutable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (self.max_tokens is None or isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             "max_tokens must be >= 1 or None", self.max_tokens),
            (self.temperature >= 0, "temperature must be >= 0", self.temperature),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be 0 or -1 (off) or >= 1", self.top_k),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0", self.repetition_penalty),
            (self.seed is None or isinstance(self.seed, int), "seed must be an int or None", self.seed),
            (all(isinstance(s, str) and s for s in stop), "stop must hold non-empty strings", self.stop),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must hold token ids >= 0", self.stop_token_ids),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ValueError(f"{message}, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def sampling_inputs(params: Sequence[SamplingParams], seeds: Sequence[int],
                    offsets: Sequence[int]) -> dict[str, np.ndarray]:
    """The ``sampling`` op's per-row inputs for S requests, keyed by role (docs/ops.md), as host arrays [S].

    seeds [S]: each request's seed (``params.seed`` or one the engine drew for it); offsets [S]: how many
    tokens the request has sampled so far, so every step draws fresh numbers from the same stream.
    Greedy requests get temperature 0 and their filters switched off.
    """
    greedy = [p.greedy for p in params]
    return {
        "temperature": np.array([0.0 if g else p.temperature for p, g in zip(params, greedy)], dtype=np.float32),
        "top_k": np.array([0 if g else p.top_k for p, g in zip(params, greedy)], dtype=np.int32),
        "top_p": np.array([1.0 if g else p.top_p for p, g in zip(params, greedy)], dtype=np.float32),
        "min_p": np.array([0.0 if g else p.min_p for p, g in zip(params, greedy)], dtype=np.float32),
        # int64 wraps: a seed of 2^63 or more keeps its low 64 bits, which is what the kernel's Philox uses.
        "seeds": np.array([(s + (1 << 63)) % (1 << 64) - (1 << 63) for s in seeds], dtype=np.int64),
        "offsets": np.array(list(offsets), dtype=np.int64),
    }


def apply_repetition_penalty(logits: np.ndarray, token_ids: Sequence[Sequence[int]],
                             penalties: Sequence[float] | np.ndarray) -> np.ndarray:
    """logits [S, V] fp32 -> a new [S, V] array with every token seen in row s (prompt + output) penalised.

    HF / vLLM rule (CTRL paper): a seen token's logit is divided by the penalty when positive and
    multiplied by it otherwise, so a penalty > 1 always makes it less likely. token_ids[s] lists row s's
    tokens (repeats allowed); penalties [S]. Runs on the host, over the rows the step brought back.
    """
    logits = np.asarray(logits)
    S, V = logits.shape
    penalty = np.asarray(penalties, dtype=logits.dtype).reshape(S)
    lengths = [len(ids) for ids in token_ids]
    if len(lengths) != S:
        raise ValueError(f"token_ids has {len(lengths)} rows, logits has {S}")
    out = logits.copy()
    for row, ids in enumerate(token_ids):
        if ids:
            cols = np.unique(np.asarray(ids, dtype=np.int64))  # a token seen twice is penalised once
            x, p = out[row, cols], penalty[row]
            out[row, cols] = np.where(x > 0, x / p, x * p)
    return out


def find_stop(text: str, stop: Iterable[str], new_chars: int) -> tuple[int, str] | None:
    """Earliest (start index, stop string) in ``text`` that overlaps its last ``new_chars`` characters.

    Only the tail can hold a new match: earlier text was checked when it arrived.
    """
    best = None
    for s in stop:
        i = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def holdback(text: str, stop: Iterable[str]) -> int:
    """How many trailing characters of ``text`` could still become the start of a stop string.

    A streaming client must not see them yet: if the stop string completes, they are cut.
    """
    n = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


@dataclass(frozen=True)
class Finish:
    """Why a request ended: reason "stop" (eos, stop token, stop string) or "length" (max_tokens).

    text is the final output text (stop strings and stop tokens' text excluded); matched is the stop
    string or token id that ended it, None for eos and length.
    """

    reason: str
    text: str
    matched: str | int | None = None


@dataclass(frozen=True)
class StopChecker:
    """Decides after each generated token whether its request is finished (vLLM's rules)."""

    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()

    def check(self, token_id: int, text: str, new_chars: int, num_tokens: int) -> Finish | None:
        """token_id: the token just generated; text: all output text so far, its last new_chars from
        that token; num_tokens: tokens generated so far, this one included. None while it goes on."""
        before = text[:len(text) - new_chars]
        if token_id in self.eos_token_ids and not self.params.ignore_eos:
            return Finish("stop", before)
        if token_id in self.params.stop_token_ids:
            return Finish("stop", before, token_id)
        hit = find_stop(text, self.params.stop, new_chars)
        if hit is not None:
            return Finish("stop", text[:hit[0]], hit[1])
        if self.params.max_tokens is not None and num_tokens >= self.params.max_tokens:
            return Finish("length", text)
        return None

    def releasable(self, text: str) -> int:
        """How many leading characters of an unfinished request's text are safe to stream."""
        return len(text) - holdback(text, self.params.stop)
