"""OpenAI's response and stream-chunk shapes, built from the engine loop's events.

Shapes as api.openai.com returns them: ``chat.completion`` / ``chat.completion.chunk`` with
``logprobs.content`` entries ({token, logprob, bytes, top_logprobs}), and the legacy ``text_completion``
with its parallel lists (tokens, token_logprobs, top_logprobs, text_offset).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from functools import lru_cache

from runtime.serving.engine_loop import PromptEvent, TokenEvent
from runtime.serving.protocol import Generation
from runtime.serving.scoring import TokenLogprob


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character that stands for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenNames:
    """Token id -> (text, bytes) as a logprobs entry shows it: the token's own bytes, not a decode in context.

    Byte-level BPE vocabularies spell bytes with GPT-2's alphabet, SentencePiece ones use ▁ for a space and
    <0xNN> for a lone byte; a token that is part of a character has a text of U+FFFD but exact bytes.
    """

    def __init__(self, tokenizer) -> None:
        backend = tokenizer.backend
        byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))
        special = {t.content for t in backend.get_added_tokens_decoder().values()}
        table = _byte_decoder()

        @lru_cache(maxsize=65536)
        def name(token_id: int) -> tuple[str, bytes]:
            piece = backend.id_to_token(token_id) or ""
            if piece in special:
                raw = piece.encode()
            elif byte_level and all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
            elif m := _BYTE_FALLBACK.fullmatch(piece):
                raw = bytes([int(m.group(1), 16)])
            else:
                raw = piece.replace("\u2581", " ").encode()
            return raw.decode("utf-8", errors="replace"), raw

        self._name = name

    def __call__(self, token_id: int) -> str:
        return self._name(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return list(self._name(token_id)[1])


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: list[TokenLogprob], names: TokenNames) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        return {"token": names(token_id), "logprob": logprob, "bytes": names.bytes(token_id)}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], names: TokenNames, offset: int) -> dict:
    """Legacy completions logprobs; ``offset``: characters of the choice's text before the first entry.

    A prompt's first token has no score (logprob None): null, as OpenAI gives it with echo.
    """
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text = names(e.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({names(i): v for i, v in e.top} if e.top else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def prompt_entries(ids: tuple[int, ...], scored: tuple[TokenLogprob | None, ...]) -> list[TokenLogprob]:
    """A prompt's logprob entries with the first token kept (logprob None) so tokens and text line up."""
    return [TokenLogprob(ids[0], None) if s is None else s for s in scored]


class Collector:
    """Everything of one request so far: each choice's text, token count, logprob entries and finish reason."""

    def __init__(self, gen: Generation, model: str) -> None:
        self.gen = gen
        self.model = model
        self.created = int(time.time())
        self.id = new_id("chatcmpl" if gen.kind == "chat" else "cmpl")
        k = gen.num_choices
        self.text = [""] * k
        self.tokens = [0] * k
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(k)]
        self.finish: list[str | None] = [None] * k
        self.prompt_logprobs: dict[int, list[TokenLogprob]] = {}
        self.closed = False  # the request's end has been booked (metrics, log, abort)

    def add(self, event: TokenEvent | PromptEvent) -> None:
        if isinstance(event, PromptEvent):
            self.prompt_logprobs[event.index] = prompt_entries(self.gen.prompts[event.index], event.logprobs)
            return
        i = event.index
        self.text[i] += event.text
        self.tokens[i] += len(event.token_ids)
        self.logprobs[i].extend(event.logprobs)
        self.finish[i] = event.finish_reason or self.finish[i]

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def usage(self) -> dict:
        return usage(sum(map(len, self.gen.prompts)), sum(self.tokens))

    def echo_text(self, index: int) -> str:
        return self.gen.prompt_texts[index // self.gen.n] if self.gen.echo else ""

    def completion_logprobs_of(self, index: int, names: TokenNames, entries: list[TokenLogprob],
                               with_prompt: bool) -> dict:
        """Choice ``index``'s legacy logprobs of ``entries``, after its prompt's when ``with_prompt`` (echo)."""
        prompt = self.prompt_logprobs.get(index // self.gen.n, []) if with_prompt else []
        head = completion_logprobs(prompt, names, 0)
        rest = completion_logprobs(entries, names, len(self.echo_text(index)) if with_prompt else 0)
        return {k: head[k] + rest[k] for k in head}

    def response(self, names: TokenNames) -> dict:
        gen, choices = self.gen, []
        for i in range(gen.num_choices):
            if gen.kind == "chat":
                lp = chat_logprobs(self.logprobs[i], names) if gen.logprobs is not None else None
                choices.append({"index": i, "message": {"role": "assistant", "content": self.text[i], "refusal": None,
                                                        "tool_calls": []},
                                "logprobs": lp, "finish_reason": self.finish[i]})
            else:
                lp = (self.completion_logprobs_of(i, names, self.logprobs[i], gen.echo)
                      if gen.logprobs is not None else None)
                choices.append({"index": i, "text": self.echo_text(i) + self.text[i], "logprobs": lp,
                                "finish_reason": self.finish[i]})
        obj = "chat.completion" if gen.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage(), "system_fingerprint": None}

    def chunk(self, choices: list[dict], with_usage: bool = False) -> dict:
        obj = "chat.completion.chunk" if self.gen.kind == "chat" else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
               "system_fingerprint": None}
        if self.gen.include_usage:  # null on every chunk but the last, as OpenAI sends it
            out["usage"] = self.usage() if with_usage else None
        return out
