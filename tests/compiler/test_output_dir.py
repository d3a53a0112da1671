"""`compiler compile --out DIR` never deletes a user's file: only an artifact and nothing else is replaced.

Every refusal is checked through the CLI as a user runs it: exit status 1, one `error: ...` line, and the
whole parent folder byte for byte as it was (nothing deleted, nothing staged left behind).
"""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.artifact import FORMAT, OLD_MARK, STAGING_MARK
from compiler.cli import main

FAST = ("--target", "cuda:90", "--dtype", "fp32", "--max-seq-len", "32", "--max-batch", "2", "--no-reference")


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` -> its bytes (None for a folder, the link text for a symlink)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = os.readlink(path).encode() if path.is_symlink() else path.read_bytes() if path.is_file() else None
    return out


def _fake_artifact(out: Path, extra: dict[str, str] | None = None, fmt: int = FORMAT) -> None:
    """A folder shaped like an artifact: a trilite manifest listing exactly the files written next to it."""
    files = {"graph.onnx": "g", "weights.safetensors": "w", "kernels/cuda-90/index.json": "{}"}
    for rel, text in {**files, **(extra or {})}.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    manifest = {"format": fmt, "model": {"dtype": "fp32"}, "targets": ["cuda:90"], "limits": {},
                "files": {rel: "0" * 64 for rel in files}}
    (out / "manifest.json").write_text(json.dumps(manifest))


def _compile(out: Path, *args: str):
    return CliRunner().invoke(main, ["compile", "tiny-llama", "--out", str(out), *FAST, *args])


def _refused(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in lines[0], lines[0]


def _user_files(d: Path) -> None:
    d.mkdir()
    (d / "notes.txt").write_text("mine")


def _artifact_plus_notes(d: Path) -> None:
    d.mkdir()
    _fake_artifact(d, extra={"notes.txt": "mine"})


def _artifact_plus_folder(d: Path) -> None:
    d.mkdir()
    _fake_artifact(d)
    (d / "kernels" / "mine").mkdir()


def _only_a_manifest(d: Path) -> None:
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"manifest_version": 3, "name": "a web extension"}))
    (d / "background.js").write_text("console.log(1)")


def _forged_manifest(d: Path) -> None:
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": {}, "model": {}, "targets": []}))
    (d / "thesis.tex").write_text("\\documentclass{article}")


def _artifact_with_symlink(d: Path) -> None:
    d.mkdir()
    _fake_artifact(d)
    os.symlink(d.parent / "elsewhere", d / "tokenizer.json")


def _a_file(d: Path) -> None:
    d.write_text("not a folder")


def _a_link(d: Path) -> None:
    (d.parent / "real").mkdir()
    os.symlink(d.parent / "real", d)


@pytest.mark.parametrize("make,message", [
    (_user_files, "holds no artifact"),
    (_artifact_plus_notes, "notes.txt"),
    (_artifact_plus_folder, "kernels/mine"),
    (_only_a_manifest, "holds no artifact"),
    (_forged_manifest, "thesis.tex"),
    (_artifact_with_symlink, "tokenizer.json"),
    (_a_file, "not a directory"),
    (_a_link, "symbolic link"),
], ids=["user-files", "artifact+user-file", "artifact+user-folder", "only-a-manifest", "forged-manifest",
        "symlink-inside", "a-file", "a-symlink"])
def test_refuses_and_changes_nothing(tmp_path, make, message):
    out = tmp_path / "out"
    make(out)
    before = _tree(tmp_path)
    _refused(_compile(out), message, "nothing was changed" if make not in (_a_file, _a_link) else "--out")
    assert _tree(tmp_path) == before


def test_replaces_an_artifact_and_cleans_leftover_staging(tmp_path):
    out = tmp_path / "model"
    (tmp_path / "neighbour.txt").write_text("mine")
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no live process has it
    leftovers = [tmp_path / f".model.{STAGING_MARK}-{dead}", tmp_path / f".model.{OLD_MARK}-{dead}"]
    for d in leftovers:
        d.mkdir()
        (d / "weights.safetensors").write_text("half written")
    other = tmp_path / f".other.{STAGING_MARK}-{dead}"  # another output's staging: not ours to remove
    other.mkdir()
    first = _compile(out)
    assert first.exit_code == 0, first.output
    assert not any(d.exists() for d in leftovers) and other.is_dir()
    second = _compile(out, "--dtype", "fp16")
    assert second.exit_code == 0, second.output
    assert json.loads((out / "manifest.json").read_text())["model"]["dtype"] == "fp16"
    assert (tmp_path / "neighbour.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", "neighbour.txt", other.name])


def test_replaces_an_artifact_of_an_earlier_format(tmp_path):
    # An artifact an older trilite wrote (format 1) is still provably one: recompiling over it is how users upgrade.
    out = tmp_path / "model"
    out.mkdir()
    _fake_artifact(out, fmt=1)
    result = _compile(out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["format"] == FORMAT


def test_an_empty_folder_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = _compile(out)
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
