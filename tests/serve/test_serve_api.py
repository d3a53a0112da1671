"""`runtime serve` on the torch backend, through the official openai client: chat and completions, streamed and
not, logprobs, echo, n, stop strings; answers compared with Engine.generate() and Engine.logits() in-process."""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest
import torch

from runtime.sampling import SamplingParams
from tests.serve.conftest import API_KEY

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def _expected(engine, prompt, n: int, **kw):
    return engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw))[0]


def test_models_lists_the_artifact(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"] and models[0].owned_by == "trilite"


def test_greedy_completion_equals_engine_generate(client, engine):
    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, **GREEDY)
    expected = _expected(engine, PROMPT, 12)
    choice = out.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert out.object == "text_completion" and out.model == "tiny-llama"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(expected.prompt_token_ids), 12)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_token_id_prompt_equals_text_prompt(client, engine):
    ids = engine.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=6, **GREEDY)
    by_text = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_completion_uses_the_chat_template(client, engine):
    messages = [{"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model="tiny-llama", messages=messages, max_completion_tokens=8, **GREEDY)
    ids = engine.tokenizer.apply_chat_template(messages, tokenize=True)
    expected = _expected(engine, ids, 8)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == expected.text
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(ids)


def test_streamed_chat_equals_non_streamed(client):
    kw = dict(model="tiny-llama", messages=[{"role": "user", "content": "stream"}], max_tokens=10, **GREEDY)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_streamed_completion_equals_non_streamed(client):
    kw = dict(model="tiny-llama", prompt=PROMPT, max_tokens=10, **GREEDY)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs_are_the_models_log_softmax(client, engine):
    messages = [{"role": "user", "content": "score me"}]
    out = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=5, logprobs=True,
                                         top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    ids = engine.tokenizer.apply_chat_template(messages, tokenize=True)
    generated = _expected(engine, ids, 5).token_ids
    lp = torch.log_softmax(torch.from_numpy(engine.logits(ids + generated[:-1])[len(ids) - 1:]), dim=-1)
    for pos, (entry, tok) in enumerate(zip(content, generated)):
        assert entry.logprob == pytest.approx(float(lp[pos, tok]), abs=1e-4)
        assert len(entry.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_completion_echo_scores_the_prompt(client, engine):
    ids = engine.tokenizer.encode(PROMPT)
    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=3, echo=True, logprobs=2, **GREEDY)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 and len(lp.text_offset) == len(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = torch.log_softmax(torch.from_numpy(engine.logits(ids)), dim=-1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert 1 <= len(lp.top_logprobs[i]) <= 2
    assert all(v <= 0 for v in lp.token_logprobs[1:])


def test_n_choices_with_a_seed_are_reproducible(client):
    kw = dict(model="tiny-llama", prompt=PROMPT, max_tokens=8, n=3, seed=7, temperature=1.0,
              extra_body={"ignore_eos": True, "top_k": 50})
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 24


def test_stop_string_is_cut(client, engine):
    full = _expected(engine, PROMPT, 12).text
    stop = full[3:5]
    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, stop=[stop], **GREEDY)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == full[:full.index(stop)]


def test_negative_penalties_make_the_output_repeat(client):
    # OpenAI's penalties subtract from the logits of tokens already generated: negative ones reward repeats
    kw = dict(model="tiny-llama", prompt=PROMPT, max_tokens=16, logprobs=0, **GREEDY)
    plain = client.completions.create(**kw).choices[0].logprobs.tokens
    looped = client.completions.create(frequency_penalty=-2.0, presence_penalty=-2.0, **kw).choices[0].logprobs.tokens
    assert len(set(looped)) < len(set(plain))


def test_stop_token_ids_and_sampling_extensions(client, engine):
    generated = _expected(engine, PROMPT, 8).token_ids
    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [generated[4]], "min_p": 0.1,
                                                "repetition_penalty": 1.0})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == generated.index(generated[4]) + 1
    assert math.isfinite(out.usage.total_tokens)


def test_requests_are_counted_in_metrics(server, client):
    client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2, **GREEDY)
    text = __import__("httpx").get(server.url + "/metrics").text
    assert 'trilite_requests_total{status="200"}' in text
    assert server.metric("trilite_generation_tokens_total") >= 2
    assert server.metric("trilite_time_to_first_token_seconds_count") >= 1
    assert server.metric("trilite_kv_blocks_in_use") == 0
    assert "POST /v1/completions 200 prompt_tokens=" in server.log()


def test_apply_penalties_counts_output_tokens_only():
    from runtime.serving.scoring import apply_penalties

    logits = np.zeros((2, 5), np.float32)  # host logits, as the engine hands them over
    out = apply_penalties(logits, [[1, 1, 3], []], [0.5, 0.5], [0.25, 0.25])
    assert out[0].tolist() == [0.0, -1.0, 0.0, -0.75, 0.0] and out[1].tolist() == [0.0] * 5
