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
# Bytes: a file bigger than this also gets the sha256 of each consecutive piece of this size in the manifest
# ("chunks"), so a start verifies one file on every core instead of one core reading it end to end.
VERIFY_CHUNK = 1 << 28


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


def _piece_sha256(path: Path, start: int, length: int) -> str:
    """The sha256 of ``length`` bytes of a file from ``start`` (fewer if the file ends first), read with pread."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(min(HASH_CHUNK, max(length, 1)))
        view = memoryview(buf)
        done = 0
        while done < length:
            n = os.preadv(fd, [view[:min(len(buf), length - done)]], start + done)
            if not n:
                break
            h.update(view[:n])
            done += n
    finally:
        os.close(fd)
    return h.hexdigest()


def chunk_sha256s(paths: Iterable[Path | str], chunk: int = VERIFY_CHUNK) -> dict[Path, list[str]]:
    """path -> [sha256 of bytes [i * chunk, (i + 1) * chunk) for each i] of every file, all pieces of all files
    hashed in parallel threads (an empty file has no pieces)."""
    paths = [Path(p) for p in paths]
    jobs = [(p, i * chunk) for p in paths for i in range(-(-p.stat().st_size // chunk))]
    with ThreadPoolExecutor(max(1, min(len(jobs), workers()))) as pool:
        digests = list(pool.map(lambda job: _piece_sha256(job[0], job[1], chunk), jobs))
    out: dict[Path, list[str]] = {p: [] for p in paths}
    for (p, _), digest in zip(jobs, digests):
        out[p].append(digest)
    return out
