"""HF model directories: config.json, *.safetensors (single or sharded), tokenizer.json, tokenizer_config.json.

Weights are read lazily through safetensors' memory map. Pickled checkpoints (pytorch_model.bin, *.pt)
are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

from compiler.fileio import read_header, read_tensor
from compiler.frontends import LazyTensors, ModelSource, SourceError, check_config, family_of

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def load_hf_dir(path: Path, name: str | None = None, sha256: str | None = None,
                progress: bool = False) -> ModelSource:
    """Load an HF model directory. ``sha256`` may be passed when it is already known (presets)."""
    path = Path(path)
    config = read_json(path / "config.json", f"{path} has no config.json: not an HF model directory")
    family_of(config)
    shards = _weight_files(path)
    check_config(config, str(path))
    tensors = safetensors_mapping(shards)
    normalise_config(config, "lm_head.weight" in tensors)
    tokenizer_json = _tokenizer_json(path)
    tokenizer_config = read_tokenizer_config(path, tokenizer_json, config)
    if sha256 is None:
        extra = [path / n for n in ("model.safetensors.index.json", "tokenizer_config.json", "chat_template.jinja",
                                    "chat_template.json", "tokenizer.json") if (path / n).is_file()]
        sha256 = files_sha256(path, [path / "config.json", *shards, *extra], progress)
    return ModelSource(name=name or path.resolve().name, config=config, tensors=tensors,
                       tokenizer_json=tokenizer_json, tokenizer_config=tokenizer_config, hf_dir=path,
                       gguf_path=None, sha256=sha256)


def read_json(path: Path, missing: str) -> dict:
    if not path.is_file():
        raise SourceError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot read {path}: {e}") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "").get("weight_map", {})
        shards = sorted({path / f for f in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise SourceError(f"{path}: shards named in model.safetensors.index.json are missing: {', '.join(missing)}")
        return shards
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for pattern in _PICKLES for p in path.glob(pattern))
    if pickles:
        raise SourceError(f"{path} holds only pickled PyTorch weights ({pickles[0]}); trilite never loads pickles: "
                          "convert them to safetensors first")
    raise SourceError(f"{path} has no *.safetensors weights")


def safetensors_mapping(shards: list[Path]) -> LazyTensors:
    """Name → tensor over one or more safetensors files, each tensor read on access."""
    loaders = {}
    for shard in shards:
        try:
            handle = safe_open(str(shard), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise SourceError(f"cannot read {shard}: {e}") from None
        entries = read_header(shard)  # safe_open checked the header; reads go around its memory map (fileio)
        for key in sorted(handle.keys()):
            loaders[key] = (lambda s=shard, e=entries[key]: read_tensor(s, e))
    return LazyTensors(loaders)


def normalise_config(config: dict, has_lm_head: bool) -> None:
    """Make the keys the model definitions read explicit, whichever transformers version wrote config.json.

    transformers 5 writes ``rope_parameters`` where older versions wrote ``rope_theta``/``rope_scaling``;
    an absent ``tie_word_embeddings`` is decided by whether the checkpoint has its own lm_head.
    """
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("rope_scaling", None)
    config.setdefault("tie_word_embeddings", not has_lm_head)


def _tokenizer_json(path: Path) -> bytes:
    file = path / "tokenizer.json"
    if file.is_file():
        return file.read_bytes()
    # Only sentencepiece or vocab files: let transformers convert them to a fast tokenizer.
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        return tok.backend_tokenizer.to_str().encode()
    except Exception as e:
        raise SourceError(f"{path} has no tokenizer.json and transformers could not build one: {e}") from None


def read_tokenizer_config(path: Path, tokenizer_json: bytes, config: dict) -> dict:
    """tokenizer_config.json with the chat template folded in and special tokens as plain strings."""
    file = path / "tokenizer_config.json"
    tc = read_json(file, "") if file.is_file() else {}
    tc.pop("added_tokens_decoder", None)  # already in tokenizer.json; large and redundant
    if not tc.get("chat_template"):
        if (path / "chat_template.jinja").is_file():
            tc["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            tc["chat_template"] = read_json(path / "chat_template.json", "").get("chat_template")
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        tc["chat_template"] = named.get("default") or next(iter(named.values()), None)
    for key in _SPECIAL_TOKENS:
        if isinstance(tc.get(key), dict):
            tc[key] = tc[key].get("content")
    _fill_special_tokens(tc, tokenizer_json, config)
    return tc


def _fill_special_tokens(tc: dict, tokenizer_json: bytes, config: dict) -> None:
    from tokenizers import Tokenizer

    wanted = {k: config.get(f"{k}_id") for k in ("bos_token", "eos_token", "pad_token") if not tc.get(k)}
    wanted = {k: v[0] if isinstance(v, list) else v for k, v in wanted.items() if v is not None}
    if not wanted:
        return
    tok = Tokenizer.from_str(tokenizer_json.decode())
    for key, token_id in wanted.items():
        token = tok.id_to_token(int(token_id))
        if token is not None:
            tc[key] = token


def files_sha256(root: Path, files: list[Path], progress: bool = False, known: dict[Path, str] | None = None) -> str:
    """One digest over several files: each file's name (relative to root) and sha256, in name order.

    Files are hashed in parallel; ``known`` gives digests already taken (while writing them), which are reused.
    """
    from artifact_format.layout import sha256_files

    files = sorted(set(files), key=lambda p: p.relative_to(root).as_posix())
    known = known or {}
    todo = [f for f in files if f not in known]
    if progress and todo:
        _console().print(f"hashing {len(todo)} file(s) of {root.name}")
    digests = {**known, **sha256_files(todo)}
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{digests[f]}\n".encode())
    return h.hexdigest()


def _console():
    from rich.console import Console

    return Console(stderr=True)
