"""The engine: an artifact, a backend and a tokenizer behind ``logits``, ``generate`` and ``stream``.

Each step the scheduler picks (prefill, decode, or both mixed) runs as one ``backend.submit`` (forward, then
sample); the sampled ids are the only thing read back to the host per step. Stop conditions (EOS, stop token ids, stop
strings, max_tokens) are checked on the host.

Asynchronous decode (``async_decode=True``, the default; tests/gpu/test_async_decode_gpu.py on the GPU): step N+1
is enqueued before step N's ids are read, through ``runtime.pipeline`` (its docstring says how). Requests with a
repetition penalty run synchronously: the penalty is applied to the logits on the host. Tokens, texts and finish
reasons are those of the synchronous path (``async_decode=False``), which reads each step's ids before scheduling
the next.

Prefix caching (``prefix_cache=True``, the default; runtime/scheduler.py): a prompt that begins with whole KV
blocks an earlier request computed (a system prompt, the turns of a chat so far) shares those blocks and is
prefilled from their end; its tokens, texts and finish reasons are those it would get with the cache off.

Mixed steps (on by default, ``mixed_steps=False`` to switch off; runtime/scheduler.py): a step carries every
running sequence's decode token and then prompt chunks up to ``max_num_batched_tokens``, so a long prompt is
prefilled over several steps while the others keep decoding, with the same tokens as without in fp32 (in bf16/fp16
the chunked rows round differently, as any change of batching does).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from artifact_format.graph import Limits
from runtime.artifact import Artifact, load_artifact
from runtime.backends import make_backend
from runtime.backends.base import Backend
from runtime.errors import ArtifactError
from runtime.kv_cache import BlockAllocator
from runtime.pipeline import HostLogits, Pipeline, Request, RequestOutput
from runtime.sampling import SamplingParams, StopChecker
from runtime.scheduler import Scheduler
from runtime.scheduler import Sequence as Seq
from runtime.step import Chunk, make_step
from runtime.tokenizer import Tokenizer

# Seeds for requests that bring none; seeded from the OS so two processes differ.
_SEEDS = random.Random()
# Prompt tokens the detokeniser sees before the first generated one (leading spaces, merges across the seam).
DECODE_CONTEXT = 4


def kv_window(graph) -> int:
    """How far back any query of the model looks: the widest sliding window when every attention node has one,
    else 0 (a full-attention layer needs every key)."""
    windows = [dict(n.attrs).get("window", 0) for n in graph.nodes if n.op == "attention"]
    return max(windows) if windows and all(windows) else 0


def step_budget(limits: Limits, max_num_batched_tokens: int | None) -> int:
    """Tokens one step may carry: ``max_num_batched_tokens``, checked against the artifact (None: all it allows)."""
    if max_num_batched_tokens is None:
        return limits.max_num_tokens
    n = max_num_batched_tokens
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_num_tokens:
        raise ValueError(f"--max-num-batched-tokens must be an integer from 1 to this artifact's max_num_tokens "
                         f"{limits.max_num_tokens}, not {n!r}")
    return n


class Engine:
    def __init__(self, artifact: Artifact, backend: Backend, tokenizer: Tokenizer, async_decode: bool = True,
                 prefix_cache: bool = True, mixed_steps: bool = True,
                 max_num_batched_tokens: int | None = None) -> None:
        """async_decode: enqueue each step before reading the previous one's ids (the module docstring);
        False reads every step's ids before the next is scheduled. prefix_cache: reuse the KV blocks of prompt
        prefixes earlier requests computed (off for sliding-window models either way). mixed_steps: decode tokens
        and prompt chunks share steps. max_num_batched_tokens: the token budget of a step (None: the artifact's
        max_num_tokens)."""
        self.artifact = artifact
        self.backend = backend
        self.tokenizer = tokenizer
        self.limits = artifact.limits
        self.vocab_size = int(artifact.graph.get_meta("vocab_size"))
        self.allocator = BlockAllocator(backend.num_blocks)
        self.scheduler = Scheduler(self.allocator, self.limits.block_size, self.limits.max_batch,
                                   step_budget(self.limits, max_num_batched_tokens), self.limits.max_seq_len,
                                   kv_window(artifact.graph), prefix_cache=prefix_cache, mixed=mixed_steps)
        self._next_id = 0
        self.async_decode = async_decode

    def close(self) -> None:
        """Free what the backend holds on its device (weights, KV cache, graphs) now rather than at process exit;
        the engine is unusable afterwards. ``with runtime.load(...) as engine:`` closes it on leaving."""
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- every position's logits -------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [len(token_ids), V] fp32 of every position, by chunked prefill of one sequence: a numpy array
        on the host, on every backend.

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
                                 self.limits.max_blocks, all_logits=True)
                out.append(np.asarray(self.backend.forward(step), dtype=np.float32))  # a host copy of its own
        finally:
            table.release()
        return np.concatenate(out)

    # -- generation --------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), batched continuously; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list")
        plist = self._params_list(params, len(prompts))
        requests = [self.request(p, sp) for p, sp in zip(prompts, plist)]
        for _ in self._run(requests):
            pass
        return [r.output() for r in requests]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces as tokens come (never part of a stop string, never half a character)."""
        request = self.request(prompt, params or SamplingParams())
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

    def request(self, prompt: str | Sequence[int], params: SamplingParams) -> Request:
        """A new request's host side and sequence (checked against the limits, not yet scheduled)."""
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
        return Request(seq, params, seed, prompt if isinstance(prompt, str) else None, decoder, checker)

    def _run(self, requests: list[Request]) -> Iterator[Request]:
        """Drive the scheduler until every request finishes; yield a request each time it gets a token."""
        by_seq = {r.seq: r for r in requests}
        for r in requests:
            self.scheduler.add(r.seq)
        pipe = self.pipeline()
        ahead = self.async_decode and not any(pipe.host.needs(r) for r in requests)
        try:
            while (turn := pipe.advance(by_seq.__getitem__, ahead)) is not None:
                if turn.done is not None:
                    for _, r, _ in turn.done.tokens:
                        yield r
        finally:
            for r in requests:  # a consumer that stopped early leaves nothing behind in the scheduler
                pipe.abort(r)

    def pipeline(self, host: HostLogits | None = None) -> Pipeline:
        """A pipeline over this engine's backend and scheduler (``host``: logits processing on the host)."""
        return Pipeline(self.backend, self.scheduler, self.limits, host)


def load(path: str | Path, backend: str = "auto", kv_cache_gb: float | None = None, rehash: bool = False,
         async_decode: bool = True, prefix_cache: bool = True, mixed_steps: bool = True,
         max_num_batched_tokens: int | None = None, **backend_kw) -> Engine:
    """Load and validate the artifact at ``path`` and make an engine on ``backend`` (auto, torch, cuda, ...).

    ``rehash``: read every file for its sha256 even when this machine verified it unchanged before.
    ``async_decode``, ``prefix_cache``, ``mixed_steps``, ``max_num_batched_tokens``: see ``Engine``."""
    artifact = load_artifact(path, rehash=rehash)
    step_budget(artifact.limits, max_num_batched_tokens)  # a bad option fails before the backend's set-up
    tokenizer = artifact_tokenizer(artifact)  # before the backend: cheap, and its failures are the user's to fix
    be = make_backend(backend, artifact, kv_cache_gb=kv_cache_gb, **backend_kw)
    return Engine(artifact, be, tokenizer, async_decode=async_decode, prefix_cache=prefix_cache,
                  mixed_steps=mixed_steps, max_num_batched_tokens=max_num_batched_tokens)


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
