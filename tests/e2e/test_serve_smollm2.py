"""The real model behind `runtime serve`: SmolLM2-135M-Instruct answers the chat question through the openai client."""

from __future__ import annotations

import openai

from tests.serve.conftest import run_server

QUESTION = "What is the capital of France?"


def test_served_smollm2_answers_paris(smollm2_artifact, tmp_path):
    with run_server(smollm2_artifact, tmp_path / "server.log", "--backend", "torch", "--kv-cache-gb", "0.25") as s:
        client = openai.OpenAI(base_url=s.v1, api_key="none", max_retries=0, timeout=300)
        out = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                             max_tokens=32, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0,
            stream=True))
    answer = out.choices[0].message.content
    assert "Paris" in answer, answer
    assert streamed == answer and out.choices[0].finish_reason == "stop"
