"""Continuous batching across HTTP requests: 32 concurrent streaming clients share decode steps and each gets its
own complete, correct stream; a client that goes away mid-request has its KV blocks freed."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from runtime.sampling import SamplingParams
from tests.serve.conftest import API_KEY

CLIENTS = 32
TOKENS = 8


def _metric_sum(server, name: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
               if line.startswith(name))


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_32_streaming_clients_share_decode_steps(server, engine):
    prompts = [f"client number {i} says" for i in range(CLIENTS)]
    expected = engine.generate(prompts, SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True))

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, list[str | None], int]:
        stream = await client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        text, finishes, used = "", [], 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finishes.append(chunk.choices[0].finish_reason)
            if chunk.usage:
                used = chunk.usage.completion_tokens
        return text, finishes, used

    async def everyone():
        client = openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120,
                                    http_client=openai.DefaultAsyncHttpxClient(
                                        limits=httpx.Limits(max_connections=CLIENTS)))
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(everyone())
    for (text, finishes, used), exp in zip(results, expected):
        assert text == exp.text and used == TOKENS
        assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert server.metric("trilite_max_batch_size_seen") == CLIENTS, "the 32 requests never ran in one step"
    # far fewer decode steps than 32 requests one at a time would need
    assert _metric_sum(server, 'trilite_engine_steps_total{kind="decode"}') < CLIENTS * TOKENS / 2
    _wait_for(lambda: server.metric("trilite_kv_blocks_in_use") == 0)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_blocks(server, stream):
    steps = lambda: _metric_sum(server, "trilite_engine_steps_total")
    aborted = server.metric("trilite_requests_aborted_total")
    before = steps()
    body = {"model": "tiny-llama", "prompt": "a long story", "max_tokens": 110, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if stream:
        with httpx.stream("POST", server.v1 + "/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert server.metric("trilite_kv_blocks_in_use") > 0
    else:
        # The client sends the whole request, then gives up reading long before 110 tokens (a few ms each).
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.v1 + "/completions", json=body, headers=headers, timeout=httpx.Timeout(10.0, read=0.05))
    _wait_for(lambda: server.metric("trilite_kv_blocks_in_use") == 0)
    _wait_for(lambda: server.metric("trilite_requests_aborted_total") == aborted + 1)
    assert server.metric("trilite_requests_running") == 0
    assert steps() - before < 100, "the request ran to its end instead of being aborted"
    assert "aborted: client gone" in server.log()
