"""Helpers for the hostile-input tests: CLI calls, the one-line-error check, rehashing a damaged artifact."""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

from click.testing import CliRunner

from artifact_format.layout import file_sha256 as sha256_file


def invoke(main, *args, env: dict | None = None, timeout_s: int = 60):
    """``main`` (a click group) with ``args`` as a user types them; a hang fails after ``timeout_s``."""
    with deadline(timeout_s):
        return CliRunner().invoke(main, [str(a) for a in args], env=env)


@contextmanager
def deadline(seconds: int):
    def fire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line_error(result, *needles: str) -> str:
    """Assert a non-zero exit ending in exactly one ``error: ...`` line on stderr and no traceback; return it.

    Lines before it may only be progress (the compiler shows which file it reads), never part of the error."""
    assert not isinstance(result.exception, TimeoutError), "the command hung"
    assert result.exit_code not in (0, None), result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    assert sum("error" in line.lower() for line in lines) == 1, result.output
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


def rehash(art: Path, *rels: str) -> None:
    """Record the current sha256 of ``rels`` in the manifest: a consistent artifact with edited content."""
    manifest = json.loads((art / "manifest.json").read_text())
    for rel in rels:
        manifest["files"][rel] = sha256_file(art / rel)
    (art / "manifest.json").write_text(json.dumps(manifest))


def edit_json(art: Path, rel: str, change) -> None:
    """Apply ``change`` to the JSON file ``rel`` and rehash it."""
    path = art / rel
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))
    rehash(art, rel)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` -> its bytes (None for a folder, the link text for a symlink)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = os.readlink(path).encode() if path.is_symlink() else path.read_bytes() if path.is_file() else None
    return out
