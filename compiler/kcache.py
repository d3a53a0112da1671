"""Content-addressed cache of compiled kernel binaries, shared by every build on this machine.

Key = compiler.aot.cache_key: kernel source hash, signature, constexprs, divisibility hints, warps,
stages, target and Triton version. A second compile of the same model compiles nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from artifact_format.layout import cache_dir
from compiler.aot import Target, cache_key, compile_launch
from kernels.spec import Launch


class BinaryCache:
    def __init__(self, root: Path | None = None):
        self.root = root or cache_dir() / "kernels"
        self.hits = 0
        self.misses = 0

    def get(self, launch: Launch, target: Target) -> tuple[str, bytes, dict]:
        """(key, binary, metadata) for a launch on a target, compiling only on a miss."""
        key = cache_key(launch, target)
        bin_path = self.root / f"{key}.{target.binary_ext}"
        meta_path = self.root / f"{key}.json"
        if bin_path.exists() and meta_path.exists():
            self.hits += 1
            return key, bin_path.read_bytes(), json.loads(meta_path.read_text())
        self.misses += 1
        binary, meta = compile_launch(launch, target)
        self.root.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a concurrent or interrupted build never sees half a file.
        for path, data in ((bin_path, binary), (meta_path, json.dumps(meta, sort_keys=True).encode())):
            tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return key, binary, meta
