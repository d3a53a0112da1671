"""Property-style: seeded random bytes and random truncations of each artifact file always end in one
`error: ...` line from the command that reads the file, never a traceback or a hang (issue 9).

Each damaged file is rehashed into the manifest, so the damage reaches the file's parser rather than stopping
at the sha256 check (the unhashed case is checked once per file too). CASES per file and kind stay small.
"""

import json
import random
import shutil

import pytest

from runtime.cli import main
from tests.runtime.hostile import invoke, one_line_error, rehash
from tests.runtime.tiny_artifact import tiny_artifact

CASES = 4
RUN = ("run", "--prompt", "Hello", "--max-tokens", "2", "--backend", "torch")
# which commands read which file (inspect reads neither tokenizer file; index.json is read by inspect and the
# kernel backends; verify reads the reference logits)
READERS = {
    "manifest.json": ("inspect", "run"),
    "graph.onnx": ("inspect", "run"),
    "weights.safetensors": ("inspect", "run"),
    "tokenizer.json": ("run",),
    "tokenizer_config.json": ("run",),
    "kernels/cuda-90/index.json": ("inspect",),
    "reference.safetensors": ("verify",),
}


def _args(command: str, art) -> list:
    if command == "run":
        return [RUN[0], art, *RUN[1:]]
    if command == "verify":
        return ["verify", art, "--backend", "torch"]
    return [command, art]


def _damaged(data: bytes, rng: random.Random, kind: str) -> bytes:
    if kind == "random":
        return rng.randbytes(rng.choice([0, 1, 8, 9, 100, len(data)]))
    return data[:rng.randrange(0, len(data) - 1)]  # at least the last byte (a JSON file's closing brace) gone


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return shutil.copytree(tiny_artifact(), tmp_path_factory.mktemp("fuzz") / "pristine")


@pytest.mark.parametrize("kind", ["random", "truncated"])
@pytest.mark.parametrize("rel", sorted(READERS))
def test_damaged_file_is_one_error_line(pristine, tmp_path, rel, kind):
    art = shutil.copytree(pristine, tmp_path / "art")
    original = (pristine / rel).read_bytes()
    rng = random.Random(f"{rel}-{kind}")
    for case in range(CASES):
        (art / rel).write_bytes(_damaged(original, rng, kind))
        if rel != "manifest.json" and case:  # case 0: left unhashed, the sha256 check must catch it
            rehash(art, rel)
        for command in READERS[rel]:
            line = one_line_error(invoke(main, *_args(command, art), timeout_s=60))
            if rel != "manifest.json" and not case and command != "inspect":  # inspect skips the hashes
                assert "sha256" in line, line
    json.loads((pristine / "manifest.json").read_text())  # the shared copy was never touched
