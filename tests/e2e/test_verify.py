"""`runtime verify` on every end-to-end artifact: it passes on each as built, and a damaged copy fails with one
clear line (a flipped weight byte, a missing kernel binary, an unknown format) or, when the damage is hidden
from the hashes, with a FAIL verdict from the numbers themselves.

Loader-level messages are tested in tests/runtime/test_artifact.py on one tiny artifact; here they go through
the CLI, on the tiny presets and on SmolLM2 (whose copies are symlink mirrors with only the damaged files real).
"""

from __future__ import annotations

import json
import re
import struct

import pytest
from click.testing import CliRunner

from artifact_format.layout import file_sha256 as sha256_file
from runtime.cli import main
from tests.e2e.conftest import SMOLLM2, TINY_PRESETS, needs_smollm2, shadow_copy

NAMES = [*TINY_PRESETS, pytest.param(SMOLLM2, marks=needs_smollm2)]
FP32_TOLERANCE = 1e-3  # runtime.verify.TOLERANCE["fp32"], restated: a silent loosening there should fail here


@pytest.fixture(scope="module", params=NAMES)
def built(request, tiny_artifact):
    name = request.param
    return name, request.getfixturevalue("smollm2_artifact") if name == SMOLLM2 else tiny_artifact(name)


def _verify(path):
    return CliRunner().invoke(main, ["verify", str(path)])  # backend auto: torch on a machine without a GPU


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _head_weight(path) -> tuple[int, int]:
    """(byte offset in weights.safetensors, element width) of the vocabulary projection that every position's
    logits read: the logits node's weight (the embedding itself when tied), or of a quantized one its fp32 scales
    (SmolLM2's Q8_0 table, served as int8_group: token 0's first (scale, min) pair leads)."""
    from runtime.artifact import load_artifact

    graph = load_artifact(path, check_hashes=False).graph
    node = next(n for n in graph.nodes if n.op == "logits")
    name = node.input("weight_scale") if node.attr("quant") else node.input("weight")
    with open(path / "weights.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        entry = json.loads(f.read(n))[name]
    assert entry["dtype"] == "F32", entry
    return 8 + n + entry["data_offsets"][0], 4


def test_verify_passes(built):
    _, path = built
    res = _verify(path)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "PASS", res.stdout
    err = float(re.search(r"relative error\s+(\S+)", res.stdout).group(1))
    assert err <= FP32_TOLERANCE and "greedy agreement 100.0%" in res.stdout, res.stdout


def test_flipped_weight_byte_is_one_clear_line(built, tmp_path):
    name, path = built
    copy = shadow_copy(path, tmp_path / "art", copied=("weights.safetensors",))
    offset, _ = _head_weight(copy)
    with open(copy / "weights.safetensors", "r+b") as f:
        f.seek(offset + 1001)
        byte = f.read(1)[0]
        f.seek(offset + 1001)
        f.write(bytes([byte ^ 0x01]))
    line = _one_line_error(_verify(copy))
    assert "weights.safetensors" in line and "sha256" in line, line
    assert f"compiler compile {name} --out {copy}" in line, line


def test_flipped_weight_behind_a_matching_hash_fails_the_numbers(built, tmp_path):
    """Someone rewrote the hash too: the logits check still catches one weight of the vocabulary projection
    (token 0's row, read at every position) multiplied by 2^128, the top exponent bit of an fp32 below 2."""
    _, path = built
    copy = shadow_copy(path, tmp_path / "art", copied=("weights.safetensors",))
    offset, width = _head_weight(copy)
    with open(copy / "weights.safetensors", "r+b") as f:
        f.seek(offset + width - 1)  # little endian: the last byte holds the sign and the top exponent bits
        top = f.read(1)[0]
        assert not top & 0x40, "expected a weight below 2 in magnitude"
        f.seek(offset + width - 1)
        f.write(bytes([top | 0x40]))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = sha256_file(copy / "weights.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    res = _verify(copy)
    assert res.exit_code == 1 and res.stdout.strip().splitlines()[-1] == "FAIL", res.output


def test_missing_kernel_binary_is_one_clear_line(built, tmp_path):
    name, path = built
    copy = shadow_copy(path, tmp_path / "art")
    binary = sorted((copy / "kernels" / "hip-gfx942").glob("*.hsaco"))[0]
    binary.unlink()  # the symlink, not the artifact's file
    assert (path / "kernels" / "hip-gfx942" / binary.name).is_file()
    line = _one_line_error(_verify(copy))
    assert f"artifact file kernels/hip-gfx942/{binary.name} is missing" in line, line
    assert f"rebuild it with `compiler compile {name} --out {copy}`" in line, line


def test_unknown_format_is_one_clear_line(built, tmp_path):
    _, path = built
    copy = shadow_copy(path, tmp_path / "art")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = 1  # what an artifact of an older trilite says
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = _one_line_error(_verify(copy))
    assert line == ("error: artifact format 1 is not supported by this runtime (format 3): recompile it with "
                    "this version's compiler"), line
