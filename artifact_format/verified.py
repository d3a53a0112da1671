"""The verified-files cache this machine keeps (``cache_dir()/verified.json``): path -> [size, mtime, ctime, inode,
sha256] of files whose bytes were found (or written) to have that sha256.

Hashing a multi-GB weights file costs seconds at every start; a file whose stat is unchanged since it was hashed
(ctime changes on any write or rename and cannot be set back) is not read again. The compiler records the files it
has just hashed, so the first start after a compile reads none of them. Shared by writer and reader, defined once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from artifact_format.layout import cache_dir


def cache_file() -> Path:
    return cache_dir() / "verified.json"


def stat_key(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class VerifiedCache:
    """The entries read at construction (none when not ``enabled``), added to by ``record``, written by ``save``."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.entries: dict = {}
        self.dirty = False
        if enabled:
            try:
                self.entries = json.loads(cache_file().read_text())
            except (OSError, ValueError):
                self.entries = {}
            if not isinstance(self.entries, dict):
                self.entries = {}

    def known(self, path: Path, digest: str) -> bool:
        """Whether ``path`` was verified to have ``digest`` and its stat has not changed since."""
        return self.enabled and self.entries.get(str(path.resolve())) == [*stat_key(path), digest]

    def record(self, path: Path, digest: str) -> None:
        """``path`` now holds bytes with ``digest``: its current stat is the key later starts compare against."""
        self.entries[str(path.resolve())] = [*stat_key(path), digest]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            target = cache_file()
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, target)
        except OSError:
            pass  # a read-only home only costs the next start a rehash
