"""Writing an artifact directory (docs/artifact.md): deterministic bytes, atomic replacement, never clobbering.

Same inputs give the same bytes: JSON with sorted keys, no timestamps, no absolute paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

FORMAT = 1


class OutputDirError(ValueError):
    pass


def dump_json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(out: Path) -> None:
    """Refuse a directory that holds anything but an earlier artifact: never overwrite unrelated files."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise OutputDirError(f"{out} is not empty and holds no artifact (no manifest.json): choose an empty or new "
                             f"directory for --out")


def staging_dir(out: Path) -> Path:
    stage = out.parent / f".{out.name}.staging-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def finish(stage: Path, out: Path, manifest: dict, known: dict[str, str] | None = None) -> None:
    """Hash every staged file into the manifest, write it, then swap the staging directory into place.

    ``known`` maps relative paths to the sha256 taken while writing them (the weights): those are not read again.
    The rest are hashed in parallel.
    """
    from compiler.fileio import sha256_files

    known = known or {}
    paths = {p.relative_to(stage).as_posix(): p for p in stage.rglob("*") if p.is_file()}
    hashed = sha256_files(p for rel, p in paths.items() if rel not in known)
    files = {rel: known[rel] if rel in known else hashed[p] for rel, p in sorted(paths.items())}
    manifest = {**manifest, "format": FORMAT, "files": files}
    (stage / "manifest.json").write_bytes(dump_json(manifest))
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old)
    else:
        os.replace(stage, out)
