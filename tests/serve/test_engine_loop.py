"""The server's EngineLoop driven directly (no HTTP) on the tiny artifact, torch backend: its asynchronous steps
against Engine.generate() and against the loop's own synchronous path (``async_decode=False``).

Requests arrive in two waves (the second once the first has tokens), so new sequences join while a step is in
flight; max_batch is 4, so some wait. Every test ends with the KV cache whole again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from click.testing import CliRunner

from runtime.engine import load
from runtime.sampling import SamplingParams
from runtime.serving.engine_loop import EngineLoop, ErrorEvent, PromptEvent
from runtime.serving.metrics import Metrics
from runtime.serving.protocol import Generation
from runtime.serving.scoring import TokenLogprob
from tests.runtime.step_trace import StepTrace
from tests.runtime.tiny_artifact import tiny_artifact

PROMPTS = ([11, 12, 13, 14], [20] * 9, [30, 31], [40, 41, 42, 43, 44, 45], [50] * 17, [60, 61, 62])


@pytest.fixture(scope="module")
def engine():
    return load(tiny_artifact(), backend="torch")


def _gen(ids, n: int = 1, logprobs: int | None = None, echo: bool = False, presence: float = 0.0,
         **params) -> Generation:
    return Generation("completion", None, (tuple(ids),), ("",), SamplingParams(**params), n=n, logprobs=logprobs,
                      echo=echo, presence_penalty=presence)


async def _consume(handle, tick=lambda: None) -> tuple[list, list[tuple]]:
    """A handle's events -> (prompt logprobs events, per choice (token ids, text, finish reason, logprobs));
    ``tick`` is called at each token event."""
    k = handle.gen.num_choices
    ids, texts, finish, lps, prompt = [[] for _ in range(k)], [""] * k, [None] * k, [[] for _ in range(k)], []
    while any(f is None for f in finish):
        event = await asyncio.wait_for(handle.events.get(), 60)
        assert not isinstance(event, ErrorEvent), event.message
        if isinstance(event, PromptEvent):
            prompt.append(event)
            continue
        tick()
        assert finish[event.index] is None, "an event after the choice's last"
        ids[event.index] += event.token_ids
        texts[event.index] += event.text
        lps[event.index] += event.logprobs
        finish[event.index] = event.finish_reason
    return prompt, [(i, t, f, tuple(lp)) for i, t, f, lp in zip(ids, texts, finish, lps)]


def _assert_same(got: list, want: list) -> None:
    """Equal, log-probabilities within 1e-4: which sequences share a step depends on timing, and one batch's fp32
    matmul rounds a little differently from another's (tokens, texts and finish reasons must be equal)."""
    def split(x, floats):
        if isinstance(x, float):
            floats.append(x)
            return float
        if isinstance(x, (list, tuple)):
            return tuple(split(v, floats) for v in x)
        if isinstance(x, (PromptEvent, TokenLogprob)):
            return type(x), split(tuple(getattr(x, f.name) for f in dataclasses.fields(x)), floats)
        return x

    got_floats, want_floats = [], []
    assert split(got, got_floats) == split(want, want_floats)
    assert got_floats == pytest.approx(want_floats, abs=1e-4)


def _idle(loop: EngineLoop, engine) -> None:
    deadline = time.monotonic() + 30
    while not (engine.scheduler.idle and loop._pipe.inflight is None and not loop._by_seq):
        assert time.monotonic() < deadline, "the loop never went idle"
        time.sleep(0.01)
    loop.stop()
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert loop._num_host == 0  # no request that needs host-side logits left behind: later steps run ahead again


def _serve(engine, first: list[Generation], later: list[Generation] = (), async_decode: bool = True,
           abort_after: int | None = None) -> tuple[list, StepTrace, EngineLoop]:
    """Run ``first``, then ``later`` once the first request has two tokens; results in submission order.
    abort_after: abort the first request at its that many-th token event (its result is then None)."""
    engine.async_decode = async_decode
    loop = EngineLoop(engine, Metrics(), max_queue=64)
    try:
        with StepTrace(engine) as trace:
            loop.start()

            async def main():
                handles, count, wave = [loop.submit(g) for g in first], [0], asyncio.Event()

                def tick():
                    count[0] += 1
                    if count[0] == 2:
                        wave.set()

                async def lead(handle):
                    if abort_after is None:
                        return await _consume(handle, tick)
                    for _ in range(abort_after):  # token events of the request, then the client goes away
                        await asyncio.wait_for(handle.events.get(), 60)
                        tick()
                    loop.abort(handle)
                    return None

                async def second_wave():
                    await wave.wait()
                    return await asyncio.gather(*(_consume(loop.submit(g)) for g in later))

                out = await asyncio.gather(lead(handles[0]), *(_consume(h) for h in handles[1:]), second_wave())
                return [*out[:-1], *out[-1]]

            results = asyncio.run(main())
            _idle(loop, engine)
    finally:
        loop.stop()
        engine.async_decode = True
    return results, trace, loop


def _mixed() -> tuple[list[Generation], list[Generation]]:
    """Greedy and seeded requests, stop token ids and stop strings, n > 1; what the stops cut is checked below."""
    first = [_gen(PROMPTS[0], max_tokens=10, temperature=0, ignore_eos=True),
             _gen(PROMPTS[1], n=2, max_tokens=8, temperature=0.9, top_k=20, seed=5, ignore_eos=True),
             _gen(PROMPTS[2], max_tokens=9, temperature=0.8, seed=11, ignore_eos=True, stop=["e", "a"])]
    later = [_gen(PROMPTS[3], max_tokens=7, temperature=0, ignore_eos=True, stop_token_ids=(0, 1, 2, 3, 4, 5)),
             _gen(PROMPTS[4], max_tokens=6, temperature=1.0, seed=3, ignore_eos=True),
             _gen(PROMPTS[5], max_tokens=1, temperature=0, ignore_eos=True)]
    return first, later


def _expected(engine, gens: list[Generation]) -> list[tuple]:
    """Engine.generate() of every choice (choice j of a seeded request samples from seed + j, as the loop does)."""
    prompts, params = [], []
    for g in gens:
        for j in range(g.n):
            prompts.append(list(g.prompts[0]))
            seed = g.params.seed + j if g.params.seed is not None else None
            params.append(dataclasses.replace(g.params, seed=seed))
    outs = iter(engine.generate(prompts, params))
    return [[(o.token_ids, o.text, o.finish_reason, ()) for o in (next(outs) for _ in range(g.n))] for g in gens]


def test_async_loop_equals_generate_and_runs_steps_ahead(engine):
    first, later = _mixed()
    expected = _expected(engine, first + later)
    assert any(f == "stop" for choices in expected for _, _, f, _ in choices)
    results, trace, loop = _serve(engine, first, later)
    assert [choices for _, choices in results] == expected
    assert all(choices[0] != choices[1] for choices in expected if len(choices) == 2)  # n=2: seeds differ
    # The loop ran ahead: nearly every step was enqueued before the previous one's ids were read, fed on the device.
    assert len(trace.submits()) > 10 and trace.ahead() >= len(trace.submits()) - 4, trace.events
    assert trace.fed > 10
    # TTFT once per request, TPOT once per choice of more than one token, each step counted once
    sample = loop.metrics.registry.get_sample_value
    assert sample("trilite_time_to_first_token_seconds_count") == len(first + later)
    assert sample("trilite_time_per_output_token_seconds_count") == sum(len(ids) > 1 for choices in expected
                                                                           for ids, *_ in choices)
    steps = sum(sample("trilite_engine_steps_total", {"kind": k}) for k in ("prefill", "decode"))
    assert steps == len(trace.submits())
    sync, sync_trace, _ = _serve(engine, first, later, async_decode=False)
    assert sync == results and sync_trace.ahead() == 0


def test_logprobs_and_penalties_run_synchronously_beside_plain_requests(engine):
    first = [_gen(PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True),
             _gen(PROMPTS[1], max_tokens=8, temperature=0.7, seed=2, ignore_eos=True)]
    later = [_gen(PROMPTS[2], logprobs=2, max_tokens=4, temperature=0, ignore_eos=True),
             _gen(PROMPTS[3], presence=-1.5, max_tokens=5, temperature=0, ignore_eos=True),
             _gen(PROMPTS[5], logprobs=1, echo=True, max_tokens=3, temperature=0, ignore_eos=True),
             _gen(PROMPTS[4], max_tokens=6, temperature=0.9, seed=4, ignore_eos=True)]
    sync, _, _ = _serve(engine, first, later, async_decode=False)
    results, trace, _ = _serve(engine, first, later)
    _assert_same(results, sync)
    (_, lp_choices), (echo_prompt, echo_choices) = results[2], results[4]
    assert [len(lp) for *_, lp in lp_choices] == [4] and [len(lp) for *_, lp in echo_choices] == [3]
    assert all(e.token_id == t and len(e.top) == 2 for e, t in zip(lp_choices[0][3], lp_choices[0][0]))
    assert len(echo_prompt) == 1 and len(echo_prompt[0].logprobs) == len(PROMPTS[5])
    assert trace.ahead() >= 3  # before the logprobs requests came, and after they left
    plain = _expected(engine, first)
    assert [results[0][1], results[1][1]] == plain


def test_abort_with_the_request_in_the_step_in_flight_frees_its_blocks(engine):
    first = [_gen([7] * 30, max_tokens=90, temperature=0, ignore_eos=True),
             _gen(PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True)]
    later = [_gen(PROMPTS[3], max_tokens=6, temperature=0.5, seed=9, ignore_eos=True)]
    caught = []
    abort = EngineLoop._abort

    def traced(self, handle):  # is a token of the aborted request still on its way?
        inflight = self._pipe.inflight
        caught.append(inflight is not None and any(r is c.req for c in self._choices.get(handle, [])
                                                   for _, r, _ in inflight.produced))
        abort(self, handle)

    EngineLoop._abort = traced
    try:
        results, trace, loop = _serve(engine, first, later, abort_after=6)
    finally:
        EngineLoop._abort = abort
    assert caught == [True]
    assert [choices for _, choices in results[1:]] == _expected(engine, first[1:] + later)


def test_no_async_decode_reaches_the_engine(monkeypatch):
    """``runtime serve --no-async-decode`` loads the engine with async_decode=False (stopped there, no server)."""
    import runtime.engine
    from runtime.cli import main

    asked = []

    def load_only(*args, **kw):
        asked.append(kw["async_decode"])
        raise RuntimeError("loaded")

    monkeypatch.setattr(runtime.engine, "load", load_only)
    for flag in ("--no-async-decode", "--async-decode", None):
        CliRunner().invoke(main, ["serve", str(tiny_artifact()), *([flag] if flag else [])])
    assert asked == [False, True, True]
