"""Capacity: requests beyond the KV cache wait their turn and still complete; beyond --max-queue they get 503 at
once. And the interpret backend (the Triton kernels on the CPU) behind the same server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from runtime.backends.base import kv_bytes_per_block
from runtime.sampling import SamplingParams
from tests.serve.conftest import run_server

PROMPT = [7] * 20  # 20 tokens + 12 generated = two KV blocks of 16: the whole cache below
BODY = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def small_server(serve_artifact, tmp_path_factory):
    from runtime.artifact import load_artifact

    gb = 2.5 * kv_bytes_per_block(load_artifact(serve_artifact, check_hashes=False)) / (1 << 30)
    log = tmp_path_factory.mktemp("serve-small") / "server.log"
    with run_server(serve_artifact, log, "--backend", "torch", "--kv-cache-gb", repr(gb),
                    "--max-queue", str(MAX_QUEUE)) as s:
        yield s


async def _post_all(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json=BODY) for _ in range(n)))


def test_requests_beyond_the_kv_cache_wait(small_server, engine):
    assert small_server.metric("trilite_kv_blocks_total") == 2
    expected = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].text
    responses = asyncio.run(_post_all(small_server.url, MAX_QUEUE))
    assert [r.status_code for r in responses] == [200] * MAX_QUEUE
    assert all(r.json()["choices"][0]["text"] == expected for r in responses)
    assert small_server.metric("trilite_max_batch_size_seen") == 1, "two requests cannot share a 2-block cache"
    # one after the other, each later request finds the prompt's first block in the prefix cache
    assert small_server.metric("trilite_prefix_cache_hit_tokens") >= 16 * (MAX_QUEUE - 1)


def test_requests_beyond_max_queue_get_503(small_server):
    responses = asyncio.run(_post_all(small_server.url, 16))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503} and codes.count(200) >= MAX_QUEUE
    busy = next(r for r in responses if r.status_code == 503).json()["error"]
    assert busy["code"] == "overloaded" and "--max-queue" in busy["message"]
    assert small_server.metric("trilite_kv_blocks_in_use") == 0


def test_interpret_backend(serve_artifact, tmp_path, engine):
    expected = engine.generate([PROMPT[:3]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0].text
    with run_server(serve_artifact, tmp_path / "server.log", "--backend", "interpret") as s:
        r = httpx.post(s.v1 + "/completions", json={**BODY, "prompt": PROMPT[:3], "max_tokens": 2}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected and r.json()["usage"]["completion_tokens"] == 2
