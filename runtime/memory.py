"""Where a Program's buffers live: the few operations it needs from a device, with no torch in this module.

A ``Memory`` hands out byte buffers, typed views at offsets into them, and the copies a step needs (host to
device, device to host, device to device). The interpret backend's memory is torch CPU tensors (the Triton
interpreter runs on them, runtime/backends/interpret.py); the cuda backend's is raw device memory through the
driver (``DeviceArray`` below, runtime/backends/cuda_memory.py). Graph dtypes are named as in
artifact_format/graph.py ("fp32", "i32", ...).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from artifact_format.graph import DTYPE_BYTES

ITEM_BYTES = DTYPE_BYTES
# Host arrays of the dtypes that cross the host boundary (bf16 and fp16 device buffers are never read back).
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16, "i32": np.int32, "i64": np.int64, "u8": np.uint8,
                "i8": np.int8}


class DeviceArray:
    """A typed, contiguous view of device memory: an address, a shape and a graph dtype name.

    What a kernel launch needs of a buffer (``data_ptr()``), what binding checks (``dtype``), and slicing along
    the first dimension, which the per-step views take (``logits[:R]``, ``ids[:rows]``).
    """

    __slots__ = ("ptr", "shape", "dtype")

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str):
        self.ptr, self.shape, self.dtype = int(ptr), tuple(shape), dtype

    def data_ptr(self) -> int:
        return self.ptr

    @property
    def itemsize(self) -> int:
        return ITEM_BYTES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> DeviceArray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a DeviceArray is sliced by a contiguous range of its first dimension only")
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(stop, start)
        row_bytes = math.prod(self.shape[1:]) * self.itemsize
        return DeviceArray(self.ptr + start * row_bytes, (stop - start, *self.shape[1:]), self.dtype)

    def __repr__(self) -> str:
        return f"DeviceArray(0x{self.ptr:x}, {self.shape}, {self.dtype})"


class Memory(ABC):
    """The device side of a Program. ``host_visible``: its buffers are host memory, so staged inputs are written
    in place (no mirror, no upload)."""

    host_visible: bool = False

    @abstractmethod
    def alloc(self, nbytes: int, zero: bool = False) -> Any:
        """A byte buffer [nbytes] (zeroed if ``zero``), kept for the Memory's lifetime."""

    @abstractmethod
    def view(self, buf: Any, offset: int, shape: tuple[int, ...], dtype: str) -> Any:
        """The typed array ``shape`` of ``dtype`` at byte ``offset`` of ``buf``."""

    @abstractmethod
    def dtype_of(self, array: Any) -> str:
        """The graph dtype name of an array this Memory made."""

    @abstractmethod
    def write(self, dst: Any, src: np.ndarray) -> None:
        """Copy host ``src`` into ``dst`` (same bytes), in order with the work already enqueued."""

    @abstractmethod
    def read(self, src: Any) -> np.ndarray:
        """A host copy of ``src`` once the work enqueued before it is done."""

    @abstractmethod
    def copy(self, dst: Any, src: Any) -> None:
        """Device-to-device copy of ``src`` into ``dst`` (same bytes), in order."""

    def gather(self, dst: Any, table: Any, index: Any) -> None:
        """dst[i] = table[index[i]] on the device (the interpret backend's feed; cuda copies ``feed_runs``)."""
        raise NotImplementedError

    def host(self, buf: Any) -> np.ndarray:
        """A host_visible buffer's bytes as a uint8 numpy array (the same memory)."""
        raise NotImplementedError

    def pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory [nbytes] uint8, for copies that run asynchronously."""
        raise NotImplementedError

    def event(self) -> Any:
        """An event: ``record()`` on the stream, ``synchronize()`` waits for what came before it."""
        raise NotImplementedError

    def typed(self, shape: tuple[int, ...], dtype: str, zero: bool = False) -> Any:
        """A buffer of its own, typed."""
        nbytes = max(math.prod(shape) * ITEM_BYTES[dtype], 1)
        return self.view(self.alloc(nbytes, zero), 0, shape, dtype)
