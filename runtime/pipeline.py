"""The step pipeline: requests' host-side bookkeeping, and at most one step in flight ahead of its results.

Asynchronous decode: the GPU must never wait for the host between steps, so step N+1 is scheduled and enqueued
before step N's ids are read. A token still in flight is a PENDING placeholder in its sequence; the next step takes
it on the device (the ``feed``: row i reads row feed[i] of step N's samples). The feed covers a step's leading rows
of one token each: all of a decode step, the decode rows a mixed step starts with (runtime/scheduler.py), so a
prompt chunk goes beside the running sequences' decode tokens with a step in flight all the same. Then step N's ids are
read (pinned memory, an event), written over their placeholders and checked for stops, one step behind the GPU.
A sequence that stopped at step N was already scheduled in step N+1: that extra token is dropped and its blocks
freed (after N+1 was enqueued, so any later step reusing them runs after it); one aborted meanwhile drops it too.
Whatever needs every id on the host first (preemption, which recomputes a sequence from its ids; logits processed
on the host, ``HostLogits``) waits for the step in flight. ``Engine`` and the server's engine loop both drive
their steps through ``Pipeline.advance``, so their tokens are those of the synchronous path (``ahead=False``),
which reads each step's ids before scheduling the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from runtime.backends.base import Backend
from runtime.sampling import Finish, SamplingParams, StopChecker, apply_repetition_penalty, sampling_inputs
from runtime.scheduler import PENDING, Batch, Scheduler
from runtime.scheduler import Sequence as Seq
from runtime.staging import PendingIds
from runtime.step import make_step
from runtime.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from artifact_format.graph import Limits


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only (a final EOS or stop token id included)
    text: str  # their text, without the stop string or EOS
    finish_reason: str | None  # "stop" | "length"


@dataclass(eq=False)
class Request:
    """One sequence's host side: its sampling settings, text so far and stop checks."""

    seq: Seq
    params: SamplingParams
    seed: int
    prompt: str | None
    decoder: StreamDecoder
    checker: StopChecker
    text: str = ""  # the output text so far (cut at a stop string once one is found)
    released: int = 0  # characters of text handed to a stream consumer
    safe: int = 0  # characters of text that can no longer become part of a stop string
    finish_reason: str | None = None  # "stop" | "length", or "abort" once dropped unfinished

    def take(self) -> str:
        """Text that became final since the last call."""
        piece, self.released = self.text[self.released:self.safe], self.safe
        return piece

    def output(self) -> RequestOutput:
        return RequestOutput(self.seq.seq_id, self.prompt, self.seq.token_ids[: self.seq.num_prompt_tokens],
                             self.seq.generated, self.text, self.finish_reason)

    def accept(self, tok: int, num_generated: int) -> str | None:
        """Take a new token (the ``num_generated``-th) into the text; the finish reason if it ends the request."""
        piece = self.decoder.push(tok)
        self.text += piece
        finish = self.checker.check(tok, self.text, len(piece), num_generated)
        if finish is None and num_generated >= self.seq.max_tokens:  # max_tokens None: the sequence is full
            finish = Finish("length", self.text)
        if finish is None:
            self.safe = self.checker.releasable(self.text)
            return None
        # Out of tokens: a character still missing bytes is shown as U+FFFD rather than dropped.
        self.text = finish.text + (self.decoder.flush() if finish.reason == "length" else "")
        self.safe = len(self.text)
        return finish.reason


class HostLogits:
    """Logits processing that needs a step's logits on the host: here the repetition penalty; the server adds
    log-probabilities and OpenAI's penalties. A batch with a row that ``needs`` it runs forward, ``apply``, then
    sample, and no step is ever in flight beside it (the caller passes ``ahead=False`` while such a request
    lives: the penalties read every token so far)."""

    def needs(self, r: Request) -> bool:
        return r.params.repetition_penalty != 1.0

    def apply(self, logits: np.ndarray, reqs: list[Request]) -> tuple[np.ndarray, object]:
        """logits [R, V] fp32 of the batch's rows -> (the logits to sample from, whatever the caller wants back
        with the step's ids: ``Done.scores``)."""
        if not any(r.params.repetition_penalty != 1.0 for r in reqs):
            return logits, None
        return apply_repetition_penalty(logits, [r.seq.token_ids for r in reqs],
                                        [r.params.repetition_penalty for r in reqs]), None


@dataclass(frozen=True)
class Launched:
    """A step on its way: its sampled ids to come and, per row that samples a new token, (row, request, the
    index of its PENDING placeholder)."""

    kind: str
    size: int  # sequences in the batch
    ids: PendingIds
    produced: tuple[tuple[int, Request, int], ...]
    scores: object = None  # HostLogits.apply's second result (host path only)


@dataclass
class Done:
    """A step whose ids were read: (row, request, token) for each request it gave a token that it kept (one
    that ended or was aborted before is left out)."""

    step: Launched
    tokens: list[tuple[int, Request, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Turn:
    launched: Launched | None  # the step enqueued on this turn
    done: Done | None  # the step read on this turn


class Pipeline:
    """Runs a scheduler's steps on a backend with at most one step in flight."""

    def __init__(self, backend: Backend, scheduler: Scheduler, limits: Limits, host: HostLogits | None = None):
        self.backend = backend
        self.scheduler = scheduler
        self.limits = limits
        self.host = host or HostLogits()
        self.inflight: Launched | None = None

    def advance(self, lookup: Callable[[Seq], Request], ahead: bool) -> Turn | None:
        """One turn: schedule and enqueue the next step, then read the step in flight before it (if any).

        ahead False: read every step before the next is scheduled. None: nothing to run and nothing in flight.
        """
        if self.inflight is not None and not ahead:
            return Turn(None, self.drain())
        batch = self.scheduler.schedule(defer=self.inflight is not None)
        if batch is None:  # done, or what comes next needs the results of the step in flight
            return Turn(None, self.drain()) if self.inflight is not None else None
        launched = self._launch(batch, [lookup(s) for s in batch.seqs], self.inflight)
        # the device runs `launched` while the host reads and checks the step before it
        done = self.drain() if self.inflight is not None else None
        self.inflight = launched
        if not ahead:
            done = self.drain()
        return Turn(launched, done)

    def drain(self) -> Done:
        """Read the step in flight (waiting for it alone)."""
        launched, self.inflight = self.inflight, None
        return self._collect(launched)

    def abort(self, r: Request) -> None:
        """Drop an unfinished request wherever it is, its blocks freed now; a token of it in flight is dropped.
        Blocks reused by a later step are written after the step in flight: steps run in order on one stream."""
        if r.finish_reason is None:
            self.scheduler.abort(r.seq)
            r.finish_reason = "abort"

    def _launch(self, batch: Batch, reqs: list[Request], prev: Launched | None) -> Launched:
        """Enqueue ``batch``; its rows whose last token is still PENDING take it from ``prev``'s samples."""
        fed, feed = [-1] * len(reqs), None
        if prev is not None:
            rows = {r.seq: row for row, r, _ in prev.produced}
            # The device gather fills the step's first ids (Program.feed_ids): the one-token rows the scheduler puts
            # first are the first tokens, so only they can be fed, and only decode rows hold PENDING tokens.
            lead = next((i for i, n in enumerate(batch.counts) if n != 1), len(batch.counts))
            fed[:lead] = [rows.get(s, -1) for s in batch.seqs[:lead]]
            if max(fed) >= 0:
                feed = np.array(fed[:lead], dtype=np.int32)
        # Only the step in flight can still owe a token: anything older was read before this one was scheduled.
        owed = [s.seq_id for s, a, n, f in zip(batch.seqs, batch.starts, batch.counts, fed)
                if PENDING in s.token_ids[a:a + n] and f < 0]
        if owed:
            raise RuntimeError(f"sequences {owed} are scheduled with tokens no step in flight will give")
        step = make_step(batch.kind, batch.chunks(), self.limits.block_size, self.limits.max_blocks)
        # Built on the CPU: every backend takes them from there (the cuda backend in one staged upload), rather than
        # six tiny host-to-device copies per decode step. Offsets count the tokens still in flight too.
        inputs = sampling_inputs([r.params for r in reqs], [r.seed for r in reqs], [r.seq.num_generated for r in reqs])
        scores = None
        if any(self.host.needs(r) for r in reqs):
            if prev is not None:  # the caller passes ahead=False while such a request lives
                raise RuntimeError("a step that needs host-side logits was scheduled with a step in flight")
            logits, scores = self.host.apply(self.backend.forward(step), reqs)
            ids = PendingIds(np.asarray(self.backend.sample(logits, **inputs)))
        else:
            ids = self.backend.submit(step, inputs, feed)
        produced = tuple((row, reqs[row], i) for row, _, i in self.scheduler.launched(batch))
        return Launched(batch.kind, len(batch.seqs), ids, produced, scores)

    def _collect(self, launched: Launched) -> Done:
        """Put a step's ids in place and check stops, freeing the blocks of each request that ends."""
        tokens = launched.ids.tokens()
        done = Done(launched)
        for row, r, i in launched.produced:
            if r.finish_reason is not None:  # it ended (or was aborted) before: this token is past its end
                continue
            r.seq.token_ids[i] = tokens[row]
            r.finish_reason = r.accept(tokens[row], i + 1 - r.seq.num_prompt_tokens)
            if r.finish_reason is not None:
                self.scheduler.finish(r.seq, i + 1)
            done.tokens.append((row, r, tokens[row]))
        return done
