"""Writing an artifact directory (docs/artifact.md): deterministic bytes, atomic replacement, never clobbering.

Same inputs give the same bytes: JSON with sorted keys, no timestamps, no absolute paths.

``--out`` may name a new path, an empty directory, or a directory that is provably an earlier artifact and
nothing else: its manifest.json parses as a trilite manifest and the directory holds exactly the files that
manifest lists. Anything else is refused before a byte is written, so a compile never deletes a user's file.
The new artifact is built in a staging directory next to the target and swapped in with renames.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from artifact_format.layout import FORMAT, VERIFY_CHUNK, chunk_sha256s, dump_json, sha256_files
from artifact_format.verified import VerifiedCache

# Leftovers of an interrupted compile carry these marks and the compiling process's id, so the next compile
# can tell its own debris (dead process) from a concurrent compile's (live process) and from a user's folder.
STAGING_MARK = "trilite-staging"
OLD_MARK = "trilite-old"
_MANIFEST_MAX_BYTES = 64 << 20  # a real manifest is kilobytes; a huge "manifest.json" is not one of ours
_SHA256 = re.compile(r"[0-9a-f]{64}")


class OutputDirError(ValueError):
    pass


def _listed_files(out: Path) -> set[str] | None:
    """The files out/manifest.json lists if it is a trilite manifest, else None."""
    path = out / "manifest.json"
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MANIFEST_MAX_BYTES:
            return None
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    # An artifact of an earlier format is still provably trilite's: a new compile may replace it.
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(fmt, int) or isinstance(fmt, bool) or not 1 <= fmt <= FORMAT:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
                                              for k, v in files.items()):
        return None
    if not isinstance(manifest.get("model"), dict) or not isinstance(manifest.get("targets"), list):
        return None
    return set(files)


def _not_only_an_artifact(out: Path) -> str | None:
    """Why ``out`` (a non-empty directory) may not be replaced, or None when it holds an artifact and nothing else."""
    listed = _listed_files(out)
    if listed is None:
        return "is not empty and holds no artifact (no trilite manifest.json)"
    allowed_dirs = {p.as_posix() for rel in listed for p in Path(rel).parents if p != Path(".")}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            return f"holds {rel}, which is not a plain file of the artifact"
        if path.is_dir() and rel not in allowed_dirs:
            return f"holds the folder {rel}, which the artifact's manifest does not list"
        if path.is_file() and rel not in listed and rel != "manifest.json":
            return f"holds {rel}, which the artifact's manifest does not list"
    return None


def check_output_dir(out: Path) -> None:
    """Refuse ``out`` unless it is new, empty, or an earlier artifact and nothing else; never touch what is there."""
    if out.is_symlink():
        raise OutputDirError(f"{out} is a symbolic link: pass the directory it points to, or a new one, as --out")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        why = _not_only_an_artifact(out)
        if why:
            raise OutputDirError(f"{out} {why}: nothing was changed; choose an empty or new directory for --out, "
                                 f"or move those files away")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def clean_leftovers(out: Path) -> None:
    """Remove staging and old-artifact folders next to ``out`` that an interrupted compile (a dead process) left."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{STAGING_MARK}|{OLD_MARK})-(\d+)")
    if not out.parent.is_dir():
        return
    for path in out.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and path.is_dir() and not path.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    out = out.absolute()
    clean_leftovers(out)
    stage = out.parent / f".{out.name}.{STAGING_MARK}-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def finish(stage: Path, out: Path, manifest: dict, known: dict[str, str] | None = None,
           chunk: int = VERIFY_CHUNK) -> None:
    """Hash every staged file into the manifest, write it, then swap the staging directory into place.

    ``known`` maps relative paths to the sha256 taken while writing them (the weights): those are not read again.
    The rest are hashed in parallel. A file bigger than ``chunk`` also gets the sha256 of each of its ``chunk``-byte
    pieces (manifest "chunks"), hashed in parallel threads, which a start verifies on every core. ``out`` is
    checked again just before the swap: a compile takes minutes, and a file the user put there meanwhile must
    survive too. The digests go into this machine's verified cache, so the first start reads none of the files.
    """
    known = known or {}
    paths = {p.relative_to(stage).as_posix(): p for p in stage.rglob("*") if p.is_file()}
    hashed = sha256_files(p for rel, p in paths.items() if rel not in known)
    files = {rel: known[rel] if rel in known else hashed[p] for rel, p in sorted(paths.items())}
    big = chunk_sha256s((p for p in paths.values() if p.stat().st_size > chunk), chunk)
    chunks = {p.relative_to(stage).as_posix(): digests for p, digests in sorted(big.items())}
    manifest = {**manifest, "format": FORMAT, "files": files,
                **({"chunks": {"size": chunk, "sha256": chunks}} if chunks else {})}
    (stage / "manifest.json").write_bytes(dump_json(manifest))
    check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        out_abs = out.absolute()
        old = out_abs.parent / f".{out_abs.name}.{OLD_MARK}-{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(stage, out)
        except OSError:
            os.replace(old, out)  # put the earlier artifact back rather than leave nothing
            raise
        shutil.rmtree(old)
    else:
        if out.exists():
            out.rmdir()  # empty: os.replace onto a directory needs it empty anyway; rmdir refuses otherwise
        os.replace(stage, out)
    _record_verified(out, files)


def _record_verified(out: Path, files: dict[str, str]) -> None:
    """Enter the files, at their final paths and with their stat after the swap (a rename changes ctime), into
    the verified cache; a cache that cannot be read or written only costs the first start a rehash."""
    try:
        cache = VerifiedCache()
        for rel, digest in files.items():
            cache.record(out / rel, digest)
        cache.save()
    except OSError:
        pass
