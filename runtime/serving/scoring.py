"""Log-probabilities and OpenAI's additive penalties, on the fp32 logits a step already produced.

Log-probabilities are those of the model's own distribution (log_softmax of the raw logits, before
penalties, temperature and filters), as vLLM reports them by default: a score tools can compare
across requests whatever their sampling settings. ``ServeLogits`` applies both to a step's logits on the host
for the engine loop (such steps run synchronously).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.pipeline import HostLogits, Request
from runtime.serving.protocol import Generation


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the ``top`` most likely (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in fp32, max-subtracted so large logits do not overflow."""
    x = np.asarray(logits, dtype=np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_logprobs(logprobs: np.ndarray, token_ids: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """logprobs [R, V] (log_softmax already applied), token_ids [R], ks [R] alternatives per row -> R entries.

    One top-k over the widest k for all rows, not one per row; of tied values the lower id comes first.
    """
    rows = len(token_ids)
    ids = np.asarray(list(token_ids), dtype=np.int64)
    chosen = logprobs[np.arange(rows), ids].tolist()
    k = max(ks, default=0)
    if k > 0:
        top = np.argsort(-logprobs, axis=-1, kind="stable")[:, :k]
        top_i, top_v = top.tolist(), np.take_along_axis(logprobs, top, axis=-1).tolist()
    out = []
    for r in range(rows):
        top = tuple(zip(top_i[r][:ks[r]], top_v[r][:ks[r]])) if ks[r] > 0 else ()
        out.append(TokenLogprob(int(token_ids[r]), float(chosen[r]), top))
    return out


def prompt_logprobs(logits: np.ndarray, token_ids: Sequence[int], k: int) -> list[TokenLogprob | None]:
    """logits [L, V] of every prompt position -> L entries; the first is None (nothing predicts it).

    Position i's token is scored by the logits of position i - 1.
    """
    if len(token_ids) < 2:
        return [None] * len(token_ids)
    lp = log_softmax(logits[:-1])
    return [None, *token_logprobs(lp, token_ids[1:], [k] * (len(token_ids) - 1))]


def apply_penalties(logits: np.ndarray, generated: Sequence[Sequence[int]], presence: Sequence[float],
                    frequency: Sequence[float]) -> np.ndarray:
    """logits [S, V] -> [S, V] minus presence * [token seen] + frequency * count, over each row's output tokens.

    OpenAI's rule: only generated tokens count (the prompt does not, unlike repetition_penalty).
    """
    S, V = logits.shape
    counts = np.zeros((S, V), dtype=logits.dtype)
    for row, ids in enumerate(generated):
        if ids:
            np.add.at(counts[row], np.asarray(list(ids), dtype=np.int64), 1)
    p = np.asarray(list(presence), dtype=logits.dtype)[:, None]
    f = np.asarray(list(frequency), dtype=logits.dtype)[:, None]
    return logits - p * (counts > 0).astype(logits.dtype) - f * counts


class ServeLogits(HostLogits):
    """The engine's host-side logits processing, plus the model's own log-probabilities (taken before penalties
    change the logits, and before sampling may reuse them) and OpenAI's presence / frequency penalties."""

    def __init__(self, gen_of: Callable[[Request], Generation]) -> None:
        self.gen_of = gen_of

    def needs(self, r: Request) -> bool:
        g = self.gen_of(r)
        return super().needs(r) or g.logprobs is not None or bool(g.presence_penalty or g.frequency_penalty)

    def apply(self, logits: np.ndarray, reqs: list[Request]) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (logits to sample from, log_softmax [R, V] of the raw logits when a row wants logprobs, else None)."""
        gens = [self.gen_of(r) for r in reqs]
        lp = log_softmax(logits) if any(g.logprobs is not None for g in gens) else None
        logits, _ = super().apply(logits, reqs)
        if any(g.presence_penalty or g.frequency_penalty for g in gens):
            logits = apply_penalties(logits, [r.seq.generated for r in reqs], [g.presence_penalty for g in gens],
                                     [g.frequency_penalty for g in gens])
        return logits, lp
