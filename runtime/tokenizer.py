"""The artifact's tokenizer: ``tokenizers`` for the text, jinja2 for the chat template, streaming decode.

Reads the files an HF model directory holds: tokenizer.json, tokenizer_config.json (special tokens, chat
template), optionally chat_template.jinja and generation_config.json. Behaves as transformers 5 does on the
same files, so prompts tokenize to the ids the reference model saw. An artifact's tokenizer is built with
``from_files`` from the files its manifest lists, never by looking around the directory.
No triton or kernels import: the GPU path loads this module.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

# transformers hands the chat template these special tokens (its special_tokens_map), by these names.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict ({"content": ...}) or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON, as transformers gives them.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@cache
def _compile(template: str) -> jinja2.Template:
    """The template in a sandbox (chat templates are untrusted code), set up as transformers sets it up."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenizer:
    """Text ↔ token ids, special tokens, EOS ids and the chat template of one model."""

    def __init__(self, backend: _Backend, config: dict, generation_config: dict | None = None,
                 chat_template: str | dict[str, str] | None = None) -> None:
        self.backend = backend
        self.config = config
        self.special_tokens = {n: t for n in SPECIAL_TOKEN_NAMES if (t := _token_text(config.get(n))) is not None}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        # transformers registers every named special token with the backend as special (new ids only for
        # strings missing from the vocabulary), which makes encode split them out and decode skip them.
        named = [*self.special_tokens.values(), *(t for t in map(_token_text, extra) if t)]
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in dict.fromkeys(named) if t not in known])
        self.add_bos_token = bool(config.get("add_bos_token", False))
        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...], the older multi-template form
            template = {t["name"]: t["template"] for t in template}
        self.chat_template = template
        self._generation_eos = (generation_config or {}).get("eos_token_id")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json from ``path`` (plus chat_template.jinja, which wins
        over the config's template as in transformers, and generation_config.json's EOS ids, if present)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json: it is needed to tokenize prompts")
        present = {n: path / n if (path / n).is_file() else None
                   for n in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")}
        return cls.from_files(path / "tokenizer.json", present["tokenizer_config.json"],
                              present["generation_config.json"], present["chat_template.jinja"])

    @classmethod
    def from_files(cls, tokenizer_json: Path, tokenizer_config: Path | None = None,
                   generation_config: Path | None = None, chat_template: Path | None = None) -> Tokenizer:
        """Load from exactly these files (None: absent); ValueError naming the file that cannot be read."""
        def read(path: Path | None) -> Any:
            if path is None:
                return None
            try:
                return path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path.name} is not UTF-8 text") from None

        def parsed(path: Path | None) -> dict:
            try:
                obj = json.loads(read(path) or "{}")
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path.name} is not valid JSON ({type(e).__name__})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path.name} is not a JSON object")
            return obj

        text = read(tokenizer_json)
        try:
            backend = _Backend.from_str(text)
        except Exception as e:  # the tokenizers library raises its own Exception type for a bad tokenizer.json
            raise ValueError(f"{tokenizer_json.name} is not a tokenizer ({str(e).splitlines()[0][:120]})") from None
        try:
            return cls(backend, parsed(tokenizer_config), parsed(generation_config), read(chat_template))
        except (TypeError, AttributeError, KeyError) as e:  # well-formed JSON of the wrong shape
            raise ValueError(f"{(tokenizer_config or tokenizer_json).name} has malformed entries ({e})") from None

    def token_id(self, name: str) -> int | None:
        """Id of a named special token ("bos_token", "eos_token", ...), None if the model has none."""
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the config's eos_token plus generation_config's eos_token_id(s)."""
        gen = self._generation_eos
        ids = set(gen if isinstance(gen, list) else [] if gen is None else [gen])
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens are those of tokenizer.json's post-processor, as transformers 5
        adds them; add_bos_token: true in the config also guarantees a leading BOS where that adds none
        (llama.cpp's rule for GGUF models, and transformers 4's for Llama tokenizers)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (EOS, chat markers) are left out unless asked for, as vLLM outputs."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_chat_template(self, name: str | None = None) -> str:
        template = self.chat_template
        if isinstance(template, dict):
            key = name or "default"
            if key not in template:
                raise ValueError(f"no chat template named {key!r}; this model has {sorted(template)}")
            return template[key]
        if template is None:
            raise ValueError("this model's tokenizer_config.json has no chat_template: use a plain prompt")
        return template

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, template_name: str | None = None, **kwargs: Any) -> str | list[int]:
        """The conversation rendered by the model's chat template, as transformers renders it.

        messages: [{"role": ..., "content": ...}, ...]. The template sees messages, add_generation_prompt,
        tools, documents, the special tokens (bos_token, eos_token, ...) and ``kwargs``. With tokenize=True
        the ids are returned, encoded without adding special tokens again (the template writes them).
        """
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        template = self.get_chat_template(template_name)
        try:
            text = _compile(template).render(messages=copy.deepcopy(list(messages)),
                                             add_generation_prompt=add_generation_prompt, **variables)
        except Exception as e:  # untrusted template code: a syntax error, raise_exception(), a sandbox refusal...
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ValueError(f"the model's chat template failed ({type(e).__name__}: {detail}): run without --chat, "
                             f"or fix chat_template in tokenizer_config.json and recompile") from None
        if not isinstance(text, str):
            raise ValueError("the model's chat template did not render text: run without --chat")
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def stream(self, context_ids: Sequence[int] = ()) -> StreamDecoder:
        return StreamDecoder(self, context_ids)


class StreamDecoder:
    """Turns token ids, fed one at a time, into text pieces that are final.

    Each token's text is the growth of decode(window) over decode(window without the new tokens), where
    the window starts a token or so back (HF TextStreamer, vLLM detokenize_incrementally). Decoding in
    context keeps SentencePiece's leading spaces right; holding text that ends in U+FFFD keeps a
    multi-byte character whole until its last byte arrives (byte-level BPE and byte fallback split them).
    context_ids (e.g. the prompt's last few tokens) give the first generated token its context.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(context_ids)
        self.prefix_offset = 0  # the window starts here
        self.read_offset = len(self.ids)  # text up to here has been released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it makes final ("" while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """The text still held back at the end of generation (an unfinished character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
