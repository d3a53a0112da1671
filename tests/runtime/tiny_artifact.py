"""One tiny-llama artifact (fp32, cross-compiled for cuda:90, max_seq_len 128, max_batch 4) per test process.

Test modules take it through a module-scoped fixture; the build runs once per process however many
modules ask, and tests that damage an artifact work on a copy.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path


@functools.lru_cache(maxsize=1)
def tiny_artifact() -> Path:
    from compiler.build import build

    root = Path(tempfile.mkdtemp(prefix="trilite-tiny-"))
    return build("tiny-llama", root / "tiny-llama", targets=["cuda:90"], dtype="fp32", max_seq_len=128,
                 max_batch=4).out


def copy_artifact(dest: Path) -> Path:
    """A private copy of the tiny artifact at ``dest`` that a test may damage."""
    shutil.copytree(tiny_artifact(), dest)
    return dest
