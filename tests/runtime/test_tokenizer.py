"""runtime.tokenizer against transformers on tokenizers built here: a byte-level BPE (GPT-2/Qwen style) and a
SentencePiece-style BPE with byte fallback (Llama style), both trained on a small in-test corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from runtime.tokenizer import StreamDecoder, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokyo is the capital of Japan. 東京は日本の首都です。",
    "I love pizza 🍕 and sushi 🍣! Das Wetter in München ist schön.",
    "Hello world, hello there. The capital of France is Paris.",
    "北京是中国的首都。天气很好。",
] * 20
# Emoji and CJK the corpus never saw in that order, so they split into byte pieces.
TEXTS = ["Hello 👋🏽 world! 東京で寿司を食べた 🍣🍕", "naïve café — 中文测试 ok", "🎉🎉 x 日本"]

CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.{% if tools %} Tools: {{ tools | tojson }}{% endif %}<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# A second, named template that insists on alternating roles (no system message).
ALTERNATING = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ message['role'] + ': ' + message['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 東京?"},
]


def byte_level() -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def byte_fallback() -> Backend:
    """Llama's layout: ▁ for spaces, <0xNN> tokens for bytes outside the vocabulary, BOS by the post-processor."""
    ascii_corpus = [line.encode("ascii", "ignore").decode() for line in CORPUS]
    base = Backend(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    base.train_from_iterator(ascii_corpus, trainer=trainer)
    vocab = base.get_vocab()
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(base.to_str())["model"]["merges"]]
    tok = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = base.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


# eos_token in the serialised AddedToken form older tokenizer_config.json files use.
EOS = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
       "single_word": False, "special": True}
CHATML_CONFIG = {"bos_token": None, "eos_token": EOS, "pad_token": "<|endoftext|>",
                 "chat_template": [{"name": "default", "template": CHATML},
                                   {"name": "alternating", "template": ALTERNATING}],
                 "tokenizer_class": "PreTrainedTokenizerFast"}
LLAMA_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                "chat_template": LLAMA2, "tokenizer_class": "PreTrainedTokenizerFast"}
KINDS = {"byte_level": (byte_level, CHATML_CONFIG), "byte_fallback": (byte_fallback, LLAMA_CONFIG)}


@pytest.fixture(scope="module", params=sorted(KINDS))
def model_dir(request, tmp_path_factory) -> Path:
    build, config = KINDS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    build().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _hf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_encode_decode_match_transformers(model_dir):
    ours, hf = Tokenizer.from_dir(model_dir), _hf(model_dir)
    for text in [*TEXTS, "Hi<|im_end|>there</s>", " leading space", ""]:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template", [None, "alternating"])
def test_chat_template_matches_transformers(model_dir, template, add_generation_prompt):
    ours, hf = Tokenizer.from_dir(model_dir), _hf(model_dir)
    if template and not isinstance(ours.chat_template, dict):
        pytest.skip("a single-template model")
    kw = dict(add_generation_prompt=add_generation_prompt, chat_template=template)
    for messages in (MESSAGES if template is None else MESSAGES[1:], MESSAGES[1:2]):
        want = hf.apply_chat_template(messages, tokenize=False, **kw)
        assert ours.apply_chat_template(messages, add_generation_prompt, template_name=template) == want
        ids = ours.apply_chat_template(messages, add_generation_prompt, tokenize=True, template_name=template)
        assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


def test_chat_template_tools_and_errors(model_dir):
    ours, hf = Tokenizer.from_dir(model_dir), _hf(model_dir)
    tools = [{"type": "function", "function": {"name": "weather", "description": "Wetter für 東京 <b>"}}]
    assert ours.apply_chat_template(MESSAGES[1:2], tools=tools) == hf.apply_chat_template(
        MESSAGES[1:2], tools=tools, tokenize=False, add_generation_prompt=True)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    name = "alternating" if isinstance(ours.chat_template, dict) else None
    with pytest.raises(ValueError, match="chat template failed .*must alternate.*run without --chat"):
        ours.apply_chat_template(bad, template_name=name)
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        hf.apply_chat_template(bad, tokenize=False, chat_template=name)


def test_special_tokens_and_eos_ids(tmp_path):
    byte_level().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(CHATML_CONFIG))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id is None and tok.eos_token_id == tok.backend.token_to_id("<|im_end|>")
    assert tok.eos_token_ids == {tok.eos_token_id}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == {0, 2}
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")  # a template file wins
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES[1:2]) == "What is the capital of France?!"
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_add_bos_token_guarantees_a_single_bos(tmp_path):
    tok = byte_fallback()
    tok.post_processor = None  # like a GGUF-derived tokenizer.json that leaves BOS to the config
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(LLAMA_CONFIG))
    ours = Tokenizer.from_dir(tmp_path)
    ids = ours.encode("Hello world")
    assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id
    assert ours.encode("Hello world", add_special_tokens=False) == ids[1:]


def _stream(decoder: StreamDecoder, ids: list[int], final: str) -> list[str]:
    pieces = []
    for t in ids:
        pieces.append(decoder.push(t))
        assert final.startswith("".join(pieces)), "a released piece was not final"
    pieces.append(decoder.flush())
    return pieces


def test_stream_decoder_never_splits_characters(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        # The test means something only if some tokens hold part of a character on their own.
        assert any("\ufffd" in tok.decode([t]) for t in ids)
        final = tok.decode(ids)
        pieces = _stream(tok.stream(), ids, final)
        assert "".join(pieces) == final
        assert not any("\ufffd" in p for p in pieces)
        assert "" in pieces[:-1], "some token must have been held back"


def test_stream_decoder_keeps_sentencepiece_spaces(tmp_path):
    byte_fallback().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(LLAMA_CONFIG))
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    final = tok.decode(ids)
    assert "".join(tok.decode([t]) for t in ids) != final  # token by token loses the spaces
    assert "".join(_stream(tok.stream(), ids, final)) == final
    # With the prompt as context, the first generated token keeps its leading space.
    prompt, gen = tok.encode("Hello world, hello"), tok.encode(" there. The capital", add_special_tokens=False)
    whole = tok.decode(prompt + gen)
    assert "".join(_stream(tok.stream(prompt[-4:]), gen, whole[len(tok.decode(prompt)):])) == " there. The capital"


def test_no_triton_or_kernels_import():
    root = Path(__file__).resolve().parents[2]
    code = ("import sys, runtime.tokenizer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'kernels')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
