"""Request bodies of /v1/chat/completions and /v1/completions -> a validated ``Generation``.

Fields follow OpenAI's API, plus vLLM's extensions (top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids). Bodies are checked here by hand, not by a pydantic model, so every problem is a 400
in OpenAI's error shape naming the field (a framework's 422 is not what OpenAI clients expect).
Value ranges are SamplingParams' own checks; unknown fields are ignored, as OpenAI and vLLM do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2

from runtime.sampling import SamplingParams

MAX_N = 16  # choices per request: each one is a sequence of its own in the batch
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; vLLM allows the same for completions


class ApiError(Exception):
    """A request the server refuses; ``status`` and the body fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Generation:
    """One validated request: its prompts as token ids and how to sample each of their ``n`` choices.

    Choice ``p * n + j`` is choice j of prompt p. ``logprobs``: alternatives per output token (None: no
    log-probabilities at all); ``echo``: completions only, the prompt is part of each choice's text, and with
    logprobs its tokens are scored too.
    """

    kind: str  # "chat" | "completion"
    model: str | None
    prompts: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str, ...]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, what: str = "") -> Any:
    """body[name] if it has one of ``kinds`` (bool is never a number here); default when missing or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _bad(name, f"expected {what or ' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    return value


def _number(body: dict, name: str, default: float | None) -> float | None:
    value = _field(body, name, (int, float), default, "a number")
    return None if value is None else float(value)


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise _bad(name, "expected a list of integers")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise _bad("stop", "expected a string or a list of strings")


def _params(body: dict, max_tokens: int | None, n: int) -> SamplingParams:
    """SamplingParams from the body; its own range checks become 400s."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=_field(body, "top_k", (int,), 0),
            min_p=_number(body, "min_p", 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),
            seed=_field(body, "seed", (int,)),
            stop=_stop(body),
            stop_token_ids=_int_list(body.get("stop_token_ids") or [], "stop_token_ids"),
            ignore_eos=_field(body, "ignore_eos", (bool,), False))
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _penalty(body: dict, name: str) -> float:
    value = _number(body, name, 0.0)
    if not -2.0 <= value <= 2.0:
        raise _bad(name, f"must be in [-2, 2], got {value}")
    return value


def _common(body: dict, kind: str, prompts: list[list[int]], texts: list[str], max_tokens: int | None,
            logprobs: int | None, echo: bool) -> Generation:
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise _bad("n", f"must be in [1, {MAX_N}], got {n}")
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), {}, "an object")
    if options and not stream:
        raise _bad("stream_options", "is only allowed with stream: true")
    include_usage = _field(options, "include_usage", (bool,), False)
    model = _field(body, "model", (str,))
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise _bad(name, "is not supported by this server")
    fmt = _field(body, "response_format", (dict,), {"type": "text"}, "an object")
    if fmt.get("type", "text") != "text":
        raise _bad("response_format", f"only type 'text' is supported, got {fmt.get('type')!r}")
    return Generation(kind, model, tuple(map(tuple, prompts)), tuple(texts), _params(body, max_tokens, n), n,
                      stream, include_usage, logprobs, echo, _penalty(body, "presence_penalty"),
                      _penalty(body, "frequency_penalty"))


def _max_tokens(body: dict, names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:  # the first one given wins: max_completion_tokens is the newer name in chat
        value = _field(body, name, (int,))
        if value is not None:
            if value < 1:
                raise _bad(name, f"must be >= 1, got {value}")
            return value
    return default


def _check_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise _bad(param, f"token ids {bad[:5]} are outside this model's vocabulary [0, {vocab_size})")
    if not ids:
        raise _bad(param, "the prompt is empty: give at least one token")
    return ids


def _message_text(content: Any, i: int) -> str:
    """A message's content as text: a string, null, or a list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise _bad(f"messages[{i}].content", "only text parts are supported")
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content", "expected a string or a list of text parts")


def parse_chat(body: Any, tokenizer, vocab_size: int) -> Generation:
    """A /v1/chat/completions body -> Generation (the artifact's chat template renders the messages)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "expected an object with a string 'role'")
        rendered.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
    try:
        ids = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True)
    except (jinja2.TemplateError, ValueError) as e:  # the template's raise_exception, or the model has none
        raise _bad("messages", f"the chat template refused them: {e}") from None
    want = _field(body, "logprobs", (bool,), False)
    top = _field(body, "top_logprobs", (int,))
    if top is not None and not want:
        raise _bad("top_logprobs", "needs logprobs: true")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None)
    return _common(body, "chat", [_check_ids(ids, vocab_size, "messages")], [""], max_tokens,
                   (top or 0) if want else None, False)


def _prompts(value: Any, tokenizer, vocab_size: int) -> tuple[list[list[int]], list[str]]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of ids, a list of lists of ids."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _bad("prompt", "expected a string, a list of strings, a list of token ids or a list of such lists")
    ids, texts = [], []
    for item in value:
        if isinstance(item, str):
            ids.append(_check_ids(tokenizer.encode(item), vocab_size, "prompt"))
            texts.append(item)
        else:
            ids.append(_check_ids(_int_list(item, "prompt"), vocab_size, "prompt"))
            texts.append(tokenizer.decode(ids[-1]))
    return ids, texts


def parse_completion(body: Any, tokenizer, vocab_size: int) -> Generation:
    """A /v1/completions body -> Generation."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("suffix"):
        raise _bad("suffix", "is not supported by this server")
    ids, texts = _prompts(body.get("prompt"), tokenizer, vocab_size)
    logprobs = _field(body, "logprobs", (int,))
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise _bad("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
    echo = _field(body, "echo", (bool,), False)
    return _common(body, "completion", ids, texts, _max_tokens(body, ("max_tokens",), 16), logprobs, echo)
