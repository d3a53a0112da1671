"""Where things are in an artifact directory and how its files are named, hashed and serialised
(docs/artifact.md): the facts the compiler writes by and the runtime reads by, defined once.

Nothing here imports torch or Triton: a machine that only serves artifacts needs none of them to read one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Bumped whenever a file of the artifact changes meaning; the runtime refuses other versions. 2: a qkv matmul node
# may carry the rope and KV-cache write (act "rope", paired q/k weight rows, cache outputs in place), which a format 1
# runtime cannot bind. 3: int8 weights (dtype i8) with a per-channel `scale` input on quantized matmul nodes (attr
# quant "int8"), and the matmul kernels take a scale pointer: a format 2 index binds the old parameter list.
# int4 (dtype u8, packed; attrs quant "int4" and group_size; its (scale, min) pairs through the same scale pointer)
# stays format 3: its kernel constexprs default to off, so a format 3 index from before it still binds and runs. So
# does rms_norm_linear's in-kernel norm weight (input norm_w, attr use_norm_w): constexpr USE_NORM_W defaults to off
# and its pointer is a last parameter with a default, bound by name. int8_group (--quant gguf: i8 weights with
# [N, K / G, 2] (scale, min), GROUP_SIZE > 0 without W_INT4) stays format 3 as well: its binaries and this runtime
# read it; a runtime from before it would misread such an artifact on its interpret backend (its kernels load the q
# unscaled), which is the case for a bump should old runtimes have to refuse these artifacts.
FORMAT = 3
REQUIRED_FILES = ("graph.onnx", "weights.safetensors", "tokenizer.json")
LIMIT_KEYS = ("max_seq_len", "max_batch", "max_num_tokens", "block_size")
# Bytes: every tensor offset in the arena and in staged inputs is a multiple, because the kernels' divisibility
# hints (tt.divisibility=16 on pointers) assume it.
ALIGN = 16
HASH_CHUNK = 1 << 26  # 64 MiB: big enough for hashlib to release the GIL, small enough to overlap other work


def target_dir(target: str) -> str:
    """The binaries of one target: ``cuda:90`` -> ``kernels/cuda-90`` (relative to the artifact)."""
    return "kernels/" + target.replace(":", "-")


def dump_json(obj: object) -> bytes:
    """Deterministic JSON bytes (sorted keys, fixed indent): the same artifact gives the same files."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def cache_dir() -> Path:
    """Where generated files live on this machine: ``$TRILITE_CACHE`` or ``~/.cache/trilite``."""
    root = os.environ.get("TRILITE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "trilite"


def workers() -> int:
    """Threads for parallel file work: one per core, at most 32."""
    return max(1, min(32, os.cpu_count() or 1))


def file_sha256(path: Path | str, chunk: int = HASH_CHUNK) -> str:
    """The sha256 of one file's bytes (hex), as ``sha256sum`` prints it."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_files(paths: Iterable[Path | str]) -> dict[Path, str]:
    """path -> sha256 for every file, hashed in parallel threads (one file per thread; a big file is the floor)."""
    paths = [Path(p) for p in paths]
    if len(paths) <= 1:
        return {p: file_sha256(p) for p in paths}
    with ThreadPoolExecutor(min(len(paths), workers())) as pool:
        return dict(zip(paths, pool.map(file_sha256, paths)))
