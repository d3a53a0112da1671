"""Hostile but fair input to `compiler compile` (issue 9): bad configs, bad targets, damaged model files.

Each case ends in one `error: ...` line with a non-zero exit, and the folder around --out is as it was.
The property-style cases feed seeded random bytes and random truncations of an HF directory's safetensors
and config and of a GGUF file; a bounded number of them keeps this to seconds.
"""

import json
import random
import shutil
from pathlib import Path

import pytest

from compiler.cli import main
from compiler.frontends import load_source
from compiler.frontends.presets import preset_dir
from tests.compiler.test_frontends import write_gguf
from tests.runtime.hostile import invoke, one_line_error, tree

FAST = ("--target", "cuda:90", "--dtype", "fp32", "--max-seq-len", "32", "--max-batch", "2", "--no-reference")
CASES = 6  # per file and kind of damage


@pytest.fixture
def hf_dir(tmp_path):
    return Path(shutil.copytree(preset_dir("tiny-llama"), tmp_path / "src"))


def _compile(tmp_path: Path, source, *args):
    before = tree(tmp_path)
    result = invoke(main, "compile", source, "--out", tmp_path / "out", *FAST, *args)
    if result.exit_code != 0:
        assert tree(tmp_path) == before, "a failed compile changed files around --out"
    return result


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_config_missing_a_size(tmp_path, hf_dir, key):
    config = json.loads((hf_dir / "config.json").read_text())
    del config[key]
    (hf_dir / "config.json").write_text(json.dumps(config))
    one_line_error(_compile(tmp_path, hf_dir), f"lacks {key}", "config.json")


def test_config_with_a_nonsense_size(tmp_path, hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["hidden_size"] = "sixty-four"
    (hf_dir / "config.json").write_text(json.dumps(config))
    one_line_error(_compile(tmp_path, hf_dir), "invalid ('sixty-four') hidden_size")


@pytest.mark.parametrize("target", ["cuda:999", "hip:gfxBOGUS", "cuda:", "metal:m3"])
def test_unknown_targets_are_refused_up_front(tmp_path, target):
    one_line_error(_compile(tmp_path, "tiny-llama", "--target", target), f"unknown target {target!r}", "cuda:90")


def test_usage_errors_and_debug(tmp_path):
    one_line_error(invoke(main, "compile"), "SOURCE")
    one_line_error(invoke(main, "compile", "tiny-llama", "--dtype", "fp64"), "fp64")
    debug = invoke(main, "--debug", "compile", "tiny-llama", "--out", tmp_path / "o", "--target", "cuda:999")
    assert isinstance(debug.exception, ValueError)


def _damaged(data: bytes, rng: random.Random, kind: str) -> bytes:
    if kind == "random":
        return rng.randbytes(rng.choice([0, 7, 8, 64, len(data)]))
    return data[:rng.randrange(0, len(data) - 1)]  # at least the last byte gone


@pytest.mark.parametrize("kind", ["random", "truncated"])
@pytest.mark.parametrize("rel", ["model.safetensors", "config.json", "tokenizer.json"])
def test_damaged_hf_files(tmp_path, hf_dir, rel, kind):
    rng = random.Random(f"{rel}-{kind}")
    original = (hf_dir / rel).read_bytes()
    for _ in range(CASES):
        (hf_dir / rel).write_bytes(_damaged(original, rng, kind))
        result = _compile(tmp_path, hf_dir)
        if rel == "tokenizer.json" and result.exit_code == 0:
            shutil.rmtree(tmp_path / "out")  # transformers rebuilt a tokenizer from the rest: a fair outcome
            continue
        one_line_error(result)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    return write_gguf(load_source("tiny-llama"), tmp_path_factory.mktemp("gguf") / "m.gguf").read_bytes()


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_damaged_gguf(tmp_path, monkeypatch, gguf_bytes, kind):
    monkeypatch.setenv("TRILITE_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    rng = random.Random(f"gguf-{kind}")
    path = tmp_path / "m.gguf"
    for _ in range(CASES):
        path.write_bytes(_damaged(gguf_bytes, rng, kind))
        one_line_error(_compile(tmp_path, path))
