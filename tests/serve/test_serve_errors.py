"""What a client gets wrong, through raw httpx: OpenAI error objects with 400 / 401 / 404, never a 500 or a
framework 422, and never a traceback in the body."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def _error(response: httpx.Response, status: int, param: str | None = "") -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    err = response.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param != "":
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_400(http, path):
    _error(http.post(path, content=b'{"prompt": "hi",', headers={"Content-Type": "application/json"}), 400)
    _error(http.post(path, content=b"\xff\xfe", headers={"Content-Type": "application/json"}), 400)
    _error(http.post(path, json=["not", "an", "object"]), 400)


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"), ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0),
    ("max_tokens", "8"), ("max_tokens", 2.5), ("n", 0), ("n", True), ("stream", "yes"), ("stop", 3),
    ("stop", [""]), ("seed", 1.5), ("top_k", -2), ("min_p", 2), ("repetition_penalty", 0),
    ("presence_penalty", 3), ("frequency_penalty", "x"), ("stop_token_ids", [-1]), ("stop_token_ids", "x"),
    ("ignore_eos", 1), ("logprobs", 50), ("echo", "no"), ("stream_options", {"include_usage": True}),
])
def test_invalid_completion_fields_are_400(http, field, value):
    _error(http.post("/v1/completions", json={**COMPLETION, field: value}), 400)


@pytest.mark.parametrize("change", [
    {"messages": []}, {"messages": "hi"}, {"messages": [{"content": "no role"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"logprobs": "yes"}, {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21},
    {"max_completion_tokens": -3}, {"tools": [{"type": "function"}]}, {"response_format": {"type": "json_object"}},
])
def test_invalid_chat_fields_are_400(http, change):
    _error(http.post("/v1/chat/completions", json={**CHAT, **change}), 400)


@pytest.mark.parametrize("prompt", [[], [[]], [1, 99999], [[1, 2], "mixed", 3], {"text": "hi"}, None, True])
def test_invalid_prompts_are_400(http, prompt):
    _error(http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}), 400)


def test_prompt_longer_than_max_seq_len_is_400(http):
    err = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": [5] * 200}), 400, "prompt")
    assert "max_seq_len" in err["message"]
    err = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": [5] * 100, "max_tokens": 100}), 400)
    assert "max_seq_len" in err["message"]


def test_content_parts_are_joined(http):
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    r = http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0


def test_unknown_fields_are_ignored(http):
    assert http.post("/v1/completions", json={**COMPLETION, "user": "someone", "best_of": 1}).status_code == 200


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")]:
            r = httpx.request(method, server.url + path, json=COMPLETION, headers=headers)
            assert _error(r, 401)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_unknown_model_is_404(http):
    err = _error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-4"}), 404, "model")
    assert err["code"] == "model_not_found"
    assert http.post("/v1/completions", json={k: v for k, v in COMPLETION.items() if k != "model"}).status_code == 200


def test_unknown_route_and_method_are_openai_errors(http):
    _error(http.get("/v1/nothing"), 404)
    _error(http.get("/v1/completions"), 405)


def test_errors_are_logged_and_counted(server, http):
    http.post("/v1/completions", json={**COMPLETION, "top_p": 9})
    assert "POST /v1/completions 400" in server.log()
    assert 'trilite_requests_total{status="400"}' in httpx.get(server.url + "/metrics").text
    assert "Traceback" not in server.log()
