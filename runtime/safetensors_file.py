"""A safetensors file read defensively: its header bounded and checked before any tensor is touched.

The header is a little-endian u64 length and that many bytes of JSON: name -> {dtype, shape, data_offsets}.
A damaged or hostile file could declare a header of exabytes (read into memory), overlapping or out-of-file
byte ranges, or shapes that disagree with their bytes; ``read_header`` refuses all of these with a reason,
so safetensors' own loader only ever sees a file whose every tensor lies inside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# safetensors' own limit on the JSON header (100 MB): a real one is kilobytes per thousand tensors.
MAX_HEADER_BYTES = 100_000_000
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}
# graph dtype names (artifact_format/graph.py) -> safetensors' names
SAFETENSORS_DTYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "i32": "I32", "i64": "I64", "u8": "U8", "i8": "I8"}


class HeaderError(ValueError):
    """A safetensors file whose header cannot be trusted; the message says why, in a few words."""


def _entry(name: str, entry: object, data_bytes: int) -> tuple[str, list[int], int, int]:
    if not isinstance(entry, dict):
        raise HeaderError(f"tensor {name!r} has no dtype/shape/offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEM_BYTES:
        raise HeaderError(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise HeaderError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise HeaderError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise HeaderError(f"tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_bytes})")
    if end - begin != math.prod(shape) * ITEM_BYTES[dtype]:
        raise HeaderError(f"tensor {name!r} of shape {shape} {dtype} does not fill its {end - begin} bytes")
    return dtype, shape, begin, end


def read_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} of every tensor (``__metadata__`` left out); HeaderError if the
    header is malformed, larger than MAX_HEADER_BYTES or describes bytes the file does not have."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"the file is {size} bytes, too short for a header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise HeaderError(f"it declares a {n}-byte header in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HeaderError(f"its header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise HeaderError("its header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    ranges = sorted((_entry(name, entry, data_bytes)[2:], name) for name, entry in header.items())
    for ((_, end), a), ((begin, _), b) in zip(ranges, ranges[1:]):
        if begin < end:
            raise HeaderError(f"tensors {a!r} and {b!r} overlap")
    return header


def check_against(header: dict[str, dict], expected: dict[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """Why the tensors of ``header`` differ from ``expected`` (name -> (graph dtype, shape)), or None."""
    for name, (dtype, shape) in expected.items():
        entry = header.get(name)
        if entry is None:
            return f"lacks tensor {name} that the graph reads"
        if entry["dtype"] != SAFETENSORS_DTYPE.get(dtype):
            return f"holds tensor {name} as {entry['dtype']}, the graph reads {SAFETENSORS_DTYPE.get(dtype, dtype)}"
        if tuple(entry["shape"]) != tuple(shape):
            return f"holds tensor {name} of shape {list(entry['shape'])}, the graph reads {list(shape)}"
    extra = sorted(set(header) - set(expected))
    if extra:
        return f"holds tensor {extra[0]} that the graph does not use"
    return None
