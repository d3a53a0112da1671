"""The engine: an artifact, a backend and a tokenizer behind ``logits``, ``generate`` and ``stream``.

Each step the scheduler picks (prefill or decode) runs as one ``backend.submit`` (forward, then sample); the
sampled ids are the only thing read back to the host per step. Stop conditions (EOS, stop token ids, stop
strings, max_tokens) are checked here, on the host.

Asynchronous decode (``async_decode=True``, the default; tests/gpu/test_async_decode_gpu.py on the GPU): the
GPU must never wait for the host between steps, so step N+1 is scheduled and enqueued before step N's ids are
read. A token still in flight is a PENDING placeholder in its sequence; the next decode step takes it on the
device (the ``feed``: row i reads row feed[i] of step N's samples). Then step N's ids are read (pinned memory, an
event), written over their placeholders and checked for stops, one step behind the GPU. A sequence that stopped
at step N was already scheduled in step N+1: that extra token is dropped and its blocks freed (after N+1 was
enqueued, so any later step reusing them runs after it). Whatever needs every id on the host first (preemption,
which recomputes a sequence from its ids; repetition penalties, applied to the logits on the host) waits for the
step in flight. Tokens, texts and finish reasons are those of the synchronous path (``async_decode=False``),
which reads each step's ids before scheduling the next.

Prefix caching (``prefix_cache=True``, the default; runtime/scheduler.py): a prompt that begins with whole KV
blocks an earlier request computed (a system prompt, the turns of a chat so far) shares those blocks and is
prefilled from their end; its tokens, texts and finish reasons are those it would get with the cache off.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from runtime.artifact import Artifact, load_artifact, max_blocks
from runtime.backends import make_backend
from runtime.backends.base import Backend
from runtime.errors import ArtifactError
from runtime.kv_cache import BlockAllocator
from runtime.sampling import Finish, SamplingParams, StopChecker, apply_repetition_penalty, sampling_inputs
from runtime.scheduler import PENDING, Batch, Scheduler
from runtime.scheduler import Sequence as Seq
from runtime.staging import PendingIds
from runtime.step import Chunk, make_step
from runtime.tokenizer import StreamDecoder, Tokenizer

# Seeds for requests that bring none; seeded from the OS so two processes differ.
_SEEDS = random.Random()
# Prompt tokens the detokeniser sees before the first generated one (leading spaces, merges across the seam).
DECODE_CONTEXT = 4


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only (a final EOS or stop token id included)
    text: str  # their text, without the stop string or EOS
    finish_reason: str | None  # "stop" | "length"


@dataclass(eq=False)
class _Request:
    seq: Seq
    params: SamplingParams
    seed: int
    prompt: str | None
    decoder: StreamDecoder
    checker: StopChecker
    text: str = ""  # the output text so far (cut at a stop string once one is found)
    released: int = 0  # characters of text handed to a stream consumer
    safe: int = 0  # characters of text that can no longer become part of a stop string
    finish_reason: str | None = None

    def take(self) -> str:
        """Text that became final since the last call."""
        piece, self.released = self.text[self.released:self.safe], self.safe
        return piece

    def output(self) -> RequestOutput:
        return RequestOutput(self.seq.seq_id, self.prompt, self.seq.token_ids[: self.seq.num_prompt_tokens],
                             self.seq.generated, self.text, self.finish_reason)


@dataclass(frozen=True)
class _Launched:
    """A step on its way: its sampled ids to come and, per row that samples a new token, (row, sequence, the
    index of its PENDING placeholder)."""

    ids: PendingIds
    produced: tuple[tuple[int, Seq, int], ...]


def kv_window(graph) -> int:
    """How far back any query of the model looks: the widest sliding window when every attention node has one,
    else 0 (a full-attention layer needs every key)."""
    windows = [dict(n.attrs).get("window", 0) for n in graph.nodes if n.op == "attention"]
    return max(windows) if windows and all(windows) else 0


class Engine:
    def __init__(self, artifact: Artifact, backend: Backend, tokenizer: Tokenizer, async_decode: bool = True,
                 prefix_cache: bool = True) -> None:
        """async_decode: enqueue each step before reading the previous one's ids (the module docstring);
        False reads every step's ids before the next is scheduled. prefix_cache: reuse the KV blocks of prompt
        prefixes earlier requests computed (off for sliding-window models either way)."""
        self.artifact = artifact
        self.backend = backend
        self.tokenizer = tokenizer
        self.limits = artifact.limits
        self.vocab_size = int(artifact.graph.get_meta("vocab_size"))
        self.allocator = BlockAllocator(backend.num_blocks)
        self.scheduler = Scheduler(self.allocator, self.limits.block_size, self.limits.max_batch,
                                   self.limits.max_num_tokens, self.limits.max_seq_len, kv_window(artifact.graph),
                                   prefix_cache=prefix_cache)
        self._next_id = 0
        self.async_decode = async_decode

    # -- every position's logits -------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> Tensor:
        """Logits [len(token_ids), V] fp32 (CPU) of every position, by chunked prefill of one sequence.

        Chunks hold at most max_batch tokens: the logits output is planned for max_batch rows.
        """
        ids = self._check_ids(token_ids)
        self.scheduler.check(len(ids), 0)
        table = self.scheduler.new_table()
        if not table.ensure(len(ids)):
            raise RuntimeError("KV blocks are in use by another request: call logits() between generations")
        chunk = min(self.limits.max_batch, self.limits.max_num_tokens)
        out = []
        try:
            for start in range(0, len(ids), chunk):
                part = ids[start:start + chunk]
                step = make_step("prefill", [Chunk(part, start, table.blocks)], self.limits.block_size,
                                 max_blocks(self.limits), all_logits=True)
                # a copy: backends may return a view of their arena, which the next chunk overwrites
                out.append(self.backend.forward(step).to("cpu", torch.float32, copy=True))
        finally:
            table.release()
        return torch.cat(out)

    # -- generation --------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), batched continuously; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list")
        plist = self._params_list(params, len(prompts))
        requests = [self._request(p, sp) for p, sp in zip(prompts, plist)]
        for _ in self._run(requests):
            pass
        return [r.output() for r in requests]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces as tokens come (never part of a stop string, never half a character)."""
        request = self._request(prompt, params or SamplingParams())
        # Closed explicitly: a consumer that stops early must free the sequence now, not whenever the collector
        # gets to the suspended inner generator.
        with contextlib.closing(self._run([request])) as run:
            for r in run:
                piece = r.take()
                if piece:
                    yield piece

    def _params_list(self, params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * n
        plist = list(params)
        if len(plist) != n:
            raise ValueError(f"got {len(plist)} SamplingParams for {n} prompts: give one, or one per prompt")
        return plist

    def _check_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside this model's vocabulary [0, {self.vocab_size})")
        return ids

    def _request(self, prompt: str | Sequence[int], params: SamplingParams) -> _Request:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        max_tokens = params.max_tokens
        if max_tokens is None:  # as many as the sequence can hold
            max_tokens = max(1, self.limits.max_seq_len - len(ids))
        self.scheduler.check(len(ids), max_tokens)
        seq = Seq(self._next_id, ids, max_tokens, self.scheduler.new_table())
        self._next_id += 1
        seed = params.seed if params.seed is not None else _SEEDS.getrandbits(62)
        decoder = self.tokenizer.stream(ids[-DECODE_CONTEXT:])
        checker = StopChecker(params, self.tokenizer.eos_token_ids)
        return _Request(seq, params, seed, prompt if isinstance(prompt, str) else None, decoder, checker)

    def _run(self, requests: list[_Request]) -> Iterator[_Request]:
        """Drive the scheduler until every request finishes; yield a request each time it gets a token."""
        by_seq = {r.seq: r for r in requests}
        for r in requests:
            self.scheduler.add(r.seq)
        ahead = self.async_decode and all(r.params.repetition_penalty == 1.0 for r in requests)
        inflight: _Launched | None = None
        try:
            while True:
                batch = self.scheduler.schedule(defer=inflight is not None)
                if batch is None:  # done, or what comes next needs the results of the step in flight
                    if inflight is None:
                        break
                    done, inflight = inflight, None
                    yield from self._collect(done, by_seq)
                    continue
                launched = self._launch(batch, [by_seq[s] for s in batch.seqs], inflight)
                if inflight is not None:  # the GPU runs `launched` while the host reads and checks these ids
                    yield from self._collect(inflight, by_seq)
                inflight = launched
                if not ahead:
                    inflight = None
                    yield from self._collect(launched, by_seq)
        finally:
            for r in requests:  # a consumer that stopped early leaves nothing behind in the scheduler
                if r.finish_reason is None:
                    self.scheduler.abort(r.seq)

    def _launch(self, batch: Batch, reqs: list[_Request], prev: _Launched | None) -> _Launched:
        """Enqueue ``batch``; its rows whose last token is still PENDING take it from ``prev``'s samples."""
        feed = None
        if prev is not None and batch.kind == "decode":
            rows = {seq: row for row, seq, _ in prev.produced}
            feed = torch.tensor([rows.get(s, -1) for s in batch.seqs], dtype=torch.int32)
        # Only the step in flight can still owe a token: anything older was read before this one was scheduled.
        fed = feed.tolist() if feed is not None else [-1] * len(reqs)
        owed = [s.seq_id for s, a, n, f in zip(batch.seqs, batch.starts, batch.counts, fed)
                if PENDING in s.token_ids[a:a + n] and f < 0]
        if owed:
            raise RuntimeError(f"sequences {owed} are scheduled with tokens no step in flight will give")
        step = make_step(batch.kind, batch.chunks(), self.limits.block_size, max_blocks(self.limits))
        params = [r.params for r in reqs]
        # Built on the CPU: every backend takes them from there (the cuda backend in one staged upload), rather than
        # six tiny host-to-device copies per decode step. Offsets count the tokens still in flight too.
        inputs = sampling_inputs(params, [r.seed for r in reqs], [r.seq.num_generated for r in reqs])
        if any(p.repetition_penalty != 1.0 for p in params):  # never with a step in flight (_run)
            logits = apply_repetition_penalty(self.backend.forward(step), [r.seq.token_ids for r in reqs],
                                              [p.repetition_penalty for p in params])
            ids = PendingIds(self.backend.sample(logits, **inputs))
        else:
            ids = self.backend.submit(step, inputs, feed)
        return _Launched(ids, tuple(self.scheduler.launched(batch)))

    def _collect(self, launched: _Launched, by_seq: dict[Seq, _Request]) -> Iterator[_Request]:
        """Read a step's ids (waiting for that step alone), put them in place, check stops; yield each request."""
        tokens = launched.ids.tokens()
        for row, seq, i in launched.produced:
            r = by_seq[seq]
            if r.finish_reason is not None:  # it ended on the step before: this token was sampled past its end
                continue
            seq.token_ids[i] = tokens[row]
            r.finish_reason = self._accept(r, tokens[row], i + 1 - seq.num_prompt_tokens)
            if r.finish_reason is not None:
                self.scheduler.finish(seq, i + 1)
            yield r

    def _accept(self, r: _Request, tok: int, num_generated: int) -> str | None:
        """Take a new token (the request's ``num_generated``-th) into its text; the finish reason if it ends it."""
        piece = r.decoder.push(tok)
        r.text += piece
        finish = r.checker.check(tok, r.text, len(piece), num_generated)
        if finish is None and num_generated >= r.seq.max_tokens:  # max_tokens None: the sequence is full
            finish = Finish("length", r.text)
        if finish is None:
            r.safe = r.checker.releasable(r.text)
            return None
        # Out of tokens: a character still missing bytes is shown as U+FFFD rather than dropped.
        r.text = finish.text + (r.decoder.flush() if finish.reason == "length" else "")
        r.safe = len(r.text)
        return finish.reason


def load(path: str | Path, backend: str = "auto", kv_cache_gb: float | None = None, rehash: bool = False,
         async_decode: bool = True, prefix_cache: bool = True, **backend_kw) -> Engine:
    """Load and validate the artifact at ``path`` and make an engine on ``backend`` (auto, torch, cuda, ...).

    ``rehash``: read every file for its sha256 even when this machine verified it unchanged before.
    ``async_decode``, ``prefix_cache``: see ``Engine``."""
    artifact = load_artifact(path, rehash=rehash)
    tokenizer = artifact_tokenizer(artifact)  # before the backend: cheap, and its failures are the user's to fix
    be = make_backend(backend, artifact, kv_cache_gb=kv_cache_gb, **backend_kw)
    return Engine(artifact, be, tokenizer, async_decode=async_decode, prefix_cache=prefix_cache)


def artifact_tokenizer(artifact: Artifact) -> Tokenizer:
    """The tokenizer from the files the manifest lists (an unlisted chat_template.jinja or generation_config.json
    lying beside them is never read), checked to emit only ids the model's embedding has rows for."""
    try:
        tok = Tokenizer.from_files(artifact.path / "tokenizer.json", artifact.file("tokenizer_config.json"),
                                   artifact.file("generation_config.json"), artifact.file("chat_template.jinja"))
    except ValueError as e:
        raise ArtifactError(f"the tokenizer of {artifact.path} cannot be loaded ({e}): {artifact.rebuild_hint}") \
            from None
    vocab = int(artifact.graph.get_meta("vocab_size"))
    top = max(tok.backend.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab:
        raise ArtifactError(f"the tokenizer of {artifact.path} has token ids up to {top}, the model only {vocab} "
                            f"embedding rows: the tokenizer belongs to another model; {artifact.rebuild_hint}")
    return tok
