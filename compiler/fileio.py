"""Big files written and hashed fast: safetensors streamed to disk with their sha256 taken on the way out, and
the sha256 of many files at once.

hashlib releases the GIL while it digests a large buffer, and so does a file write: a writer hashes each chunk
in a helper thread while it writes the same chunk, and a thread pool hashes several files on as many cores.
Every digest is still the plain sha256 of a file's bytes, so ``sha256sum`` agrees with it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from artifact_format.layout import HASH_CHUNK as CHUNK

# safetensors' dtype names in the order its writer lays tensors out (descending dtype, then name), so a file
# written here has the bytes safetensors.torch.save_file would write (tests compare the two).
_DTYPES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
           torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_RANK = {dtype: i for i, dtype in enumerate(_DTYPES)}

T = TypeVar("T")


def in_order(fn: Callable[[str], T], items: Sequence[str], pool: Executor | None, ahead: int) -> Iterator[T]:
    """fn(item) for each item in order, up to ``ahead`` of them computed in ``pool`` before they are wanted."""
    if pool is None or ahead < 1:
        yield from (fn(item) for item in items)
        return
    queue, it = deque(), iter(items)
    for item in it:
        queue.append(pool.submit(fn, item))
        if len(queue) > ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def layout(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[tuple[str, torch.dtype, tuple]]:
    """The tensors in the order safetensors stores them: widest dtype first, then by name."""
    return sorted(specs, key=lambda s: (_RANK[s[1]], s[0]))


def header(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file, ``specs`` already in ``layout`` order."""
    head: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        head[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def read_header(path: Path | str) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) of every tensor of a safetensors file, offsets in the file."""
    names = {v: k for k, v in _DTYPES.items()}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return {name: (names[e["dtype"]], tuple(e["shape"]), 8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1])
            for name, e in head.items()}


def read_tensor(path: Path | str, entry: tuple[torch.dtype, tuple[int, ...], int, int]) -> torch.Tensor:
    """One tensor of a safetensors file (an entry of ``read_header``), read with one big read, not memory-mapped.

    A mapped tensor is read later, page fault by page fault, by whatever touches it first; one read of the
    whole range runs at the disk's (or page cache's) speed and without the GIL, so threads read tensors at once.
    """
    dtype, shape, start, end = entry
    t = torch.empty(shape, dtype=dtype)
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(bytearray())
    if len(view) != end - start:
        raise ValueError(f"{path}: a tensor of {end - start} bytes does not hold {dtype} {shape}")
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{path} ends inside a tensor: the file is truncated")
            done += n
    return t


def _host_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_safetensors(path: Path | str, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                      make: Callable[[str], torch.Tensor], metadata: dict | None = None,
                      pool: Executor | None = None, ahead: int = 0) -> str:
    """Write a safetensors file whose tensor ``name`` is ``make(name)`` (any device); returns the file's sha256.

    One tensor is in host memory at a time (plus ``ahead`` made early in ``pool``), each written and hashed in
    chunks as it comes, so the file is never read back to hash it.
    """
    specs = layout(specs)
    with open(path, "wb") as f, ThreadPoolExecutor(1) as hasher:
        h, head = hashlib.sha256(), header(specs, metadata)
        pending = hasher.submit(h.update, head)
        f.write(head)
        for (name, dtype, shape), t in zip(specs, in_order(make, [s[0] for s in specs], pool, ahead)):
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: made {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}")
            data = _host_bytes(t)
            for start in range(0, len(data), CHUNK):
                chunk = data[start:start + CHUNK]
                pending.result()  # sha256 takes chunks in file order, one at a time
                pending = hasher.submit(h.update, chunk)
                f.write(chunk)
        pending.result()
    return h.hexdigest()


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """safetensors.torch.save_file's bytes, streamed and hashed on the way; returns the file's sha256."""
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    return write_safetensors(path, specs, tensors.__getitem__, metadata)
