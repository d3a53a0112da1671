"""The engine loop: one thread owns the engine and runs its steps back to back.

HTTP handlers never touch the engine. They ``submit`` a Generation and read its Handle's asyncio
queue; the loop thread drains an inbox of submissions and aborts before every step, so requests join
the running batch between steps (continuous batching across requests) and an abort frees the
request's KV blocks at the next step. Events go back to the handler's event loop through
``call_soon_threadsafe``: the decode loop never waits for HTTP work.

Steps go through the engine's pipeline (``runtime.pipeline``), asynchronous as ``Engine.generate`` is: step N+1
is enqueued before step N's ids are read, and step N's tokens go out one step behind the device. On top of
``Engine.generate`` the loop adds log-probabilities and OpenAI's additive penalties; while a request that needs
a step's logits on the host lives (those, or the repetition penalty), each step is read before the next is
scheduled, and an echo request's prompt is scored (a prefill of its own) with no step in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from runtime.engine import Engine
from runtime.kv_cache import blocks_for
from runtime.pipeline import Done, Request
from runtime.serving.metrics import Metrics
from runtime.serving.protocol import ApiError, Generation
from runtime.serving.scoring import ServeLogits, TokenLogprob, prompt_logprobs, token_logprobs

log = logging.getLogger("trilite.serve")


@dataclass(frozen=True)
class TokenEvent:
    """New output of choice ``index``: text now final, the tokens behind it, and their log-probabilities."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclass(frozen=True)
class PromptEvent:
    """Prompt ``index``'s per-token log-probabilities (echo with logprobs), sent before its choices' tokens."""

    index: int
    logprobs: tuple[TokenLogprob | None, ...]


@dataclass(frozen=True)
class ErrorEvent:
    message: str


class Handle:
    """The handler's side of one submitted Generation: an asyncio queue of events, filled from the loop thread."""

    def __init__(self, gen: Generation, loop: asyncio.AbstractEventLoop) -> None:
        self.gen = gen
        self.events: asyncio.Queue = asyncio.Queue()
        self.submitted = time.perf_counter()
        self.first: float | None = None  # when its first token came (of any choice)
        self._loop = loop

    def put(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


@dataclass(eq=False)
class _Choice:
    handle: Handle
    index: int
    req: Request  # the engine's request record (sequence, decoder, stop checker, text)
    first: float | None = None  # when its first token came


class EngineLoop:
    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch_seen = 0
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, Handle]] = deque()
        self._queued = 0  # choices submitted and not yet taken from the inbox
        self._pending: deque[Handle] = deque()  # waiting for KV blocks to score their prompts (echo + logprobs)
        self._pending_choices = 0  # kept as a count: handlers read it while this thread changes _pending
        self._choices: dict[Handle, list[_Choice]] = {}
        self._by_seq: dict[object, _Choice] = {}
        self._num_host = 0  # choices in _by_seq that need host-side logits: while any live, no step runs ahead
        self._host = ServeLogits(lambda r: self._by_seq[r.seq].handle.gen)
        self._pipe = engine.pipeline(self._host)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- the handlers' side (event-loop thread) ------------------------------------------------------

    def check(self, gen: Generation) -> None:
        """Refuse a request that can never run (400), before it is queued. Reads only fixed limits."""
        for ids in gen.prompts:
            max_tokens = gen.params.max_tokens or max(1, self.engine.limits.max_seq_len - len(ids))
            try:
                self.engine.scheduler.check(len(ids), max_tokens)
            except ValueError as e:
                raise ApiError(400, str(e), param="prompt" if gen.kind == "completion" else "messages") from None

    def submit(self, gen: Generation) -> Handle:
        self.check(gen)
        handle = Handle(gen, asyncio.get_running_loop())
        with self._cond:
            if not self._thread.is_alive():
                raise ApiError(503, "the engine loop is not running", kind="server_error")
            if self.num_waiting + gen.num_choices > self.max_queue:
                raise ApiError(503, f"the server is busy: {self.num_waiting} requests are waiting "
                               f"(--max-queue {self.max_queue}); retry later", kind="server_error", code="overloaded")
            self._inbox.append(("add", handle))
            self._queued += gen.num_choices
            self._cond.notify()
        return handle

    def abort(self, handle: Handle) -> None:
        """The client is gone: drop its choices at the next step (a finished request is left as it is)."""
        with self._cond:
            self._inbox.append(("abort", handle))
            self._cond.notify()

    @property
    def num_waiting(self) -> int:
        return self._queued + len(self.engine.scheduler.waiting) + self._pending_choices

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the loop thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        sched, pipe = self.engine.scheduler, self._pipe
        while True:
            with self._cond:
                # never asleep with a step in flight: its tokens are owed to clients
                while not self._stop and not self._inbox and sched.idle and not self._pending and pipe.inflight is None:
                    self._cond.wait()
                if self._stop:
                    return
                work, self._inbox = list(self._inbox), deque()
            for op, handle in work:
                try:
                    (self._add if op == "add" else self._abort)(handle)
                except Exception as e:  # a fault of the server (requests were checked): fail this one, go on
                    self._fail([handle], e)
                finally:
                    if op == "add":  # counted as queued until the scheduler (or _pending) holds it
                        with self._cond:
                            self._queued -= handle.gen.num_choices
            try:
                self._admit_pending()
                if not sched.idle or pipe.inflight is not None:
                    self._step()
            except Exception as e:  # a fault of the server, not of a request: fail what runs, keep serving
                pipe.inflight = None  # never read: every request it holds is failed here
                self._fail(list(self._choices) + list(self._pending), e)

    def _fail(self, handles: list[Handle], e: Exception) -> None:
        log.error("engine loop: %s: %s", type(e).__name__, e, exc_info=e)
        for handle in handles:
            handle.put(ErrorEvent(f"internal error: {type(e).__name__}"))
            self._abort(handle)

    def _add(self, handle: Handle) -> None:
        if handle.gen.echo and handle.gen.logprobs is not None:
            self._pending.append(handle)  # its prompts are scored first, when KV blocks allow
            self._pending_choices += handle.gen.num_choices
        else:
            self._start(handle)

    def _admit_pending(self) -> None:
        """Score the prompts of echo requests with a full-logits prefill, then start them; oldest first."""
        alloc, bs = self.engine.allocator, self.engine.limits.block_size
        while self._pending:
            handle = self._pending[0]
            if max(blocks_for(len(p), bs) for p in handle.gen.prompts) > alloc.num_free:
                return
            if self._pipe.inflight is not None:  # the scoring prefill runs outside the pipeline: nothing beside it
                self._emit(self._pipe.drain())
            self._pending.popleft()
            self._pending_choices -= handle.gen.num_choices
            for i, ids in enumerate(handle.gen.prompts):
                handle.put(PromptEvent(i, tuple(prompt_logprobs(self.engine.logits(ids), ids, handle.gen.logprobs))))
            self._start(handle)

    def _start(self, handle: Handle) -> None:
        gen, choices = handle.gen, []
        for p, ids in enumerate(gen.prompts):
            for j in range(gen.n):
                params = gen.params
                if params.seed is not None and j:  # n choices from one seed must differ
                    params = dataclasses.replace(params, seed=params.seed + j)
                req = self.engine.request(list(ids), params)
                choices.append(_Choice(handle, p * gen.n + j, req))
        self._choices[handle] = choices
        for c in choices:
            self._by_seq[c.req.seq] = c
            self._num_host += self._host.needs(c.req)
            self.engine.scheduler.add(c.req.seq)

    def _abort(self, handle: Handle) -> None:
        if handle in self._pending:
            self._pending.remove(handle)
            self._pending_choices -= handle.gen.num_choices
        for c in self._choices.pop(handle, []):
            self._pipe.abort(c.req)  # blocks freed now; a token of it in the step in flight is dropped
            if c.req.seq in self._by_seq:
                self._forget(c)

    def _step(self) -> None:
        """One turn of the pipeline: enqueue the next step, then hand out the tokens of the one before it."""
        ahead = self.engine.async_decode and self._num_host == 0
        turn = self._pipe.advance(lambda seq: self._by_seq[seq].req, ahead)
        if turn is not None and turn.done is not None:
            self._emit(turn.done)

    def _emit(self, done: Done) -> None:
        """Events for a step whose ids were read: each choice's new text and token, with its logprobs if asked."""
        self._record_batch(done.step.kind, done.step.size)
        scored: dict[int, TokenLogprob] = {}
        want = [(row, tok, k) for row, r, tok in done.tokens if (k := self._by_seq[r.seq].handle.gen.logprobs)
                is not None]
        if done.step.scores is not None and want:
            rows, toks, ks = zip(*want)
            scored = dict(zip(rows, token_logprobs(done.step.scores[list(rows)], toks, ks)))
        now = time.perf_counter()
        for row, r, tok in done.tokens:
            c = self._by_seq[r.seq]
            if c.first is None:
                c.first = now
            if c.handle.first is None:
                c.handle.first = now
                self.metrics.ttft.observe(now - c.handle.submitted)
            lps = (scored[row],) if row in scored else ()
            c.handle.put(TokenEvent(c.index, r.take(), (tok,), lps, r.finish_reason))
            if r.finish_reason is not None:
                self._finished(c, now)

    def _finished(self, c: _Choice, now: float) -> None:
        n = c.req.seq.num_generated
        if n > 1:
            self.metrics.tpot.observe((now - c.first) / (n - 1))
        self._forget(c)
        # the last of its choices to be handed out: choices that end in one step all have finish reasons by now
        if all(o.req.seq not in self._by_seq for o in self._choices[c.handle]):
            del self._choices[c.handle]

    def _forget(self, c: _Choice) -> None:
        self._num_host -= self._host.needs(c.req)  # before it leaves _by_seq, where needs() finds its Generation
        del self._by_seq[c.req.seq]

    def _record_batch(self, kind: str, size: int) -> None:
        self.metrics.steps.labels(kind).inc()
        self.metrics.batch_size.labels(kind).observe(size)
        if size > self.max_batch_seen:
            self.max_batch_seen = size
            log.debug("largest batch so far: %d sequences in a %s step", size, kind)
