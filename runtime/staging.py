"""Buffers that travel from host to device together, in one copy per step (step inputs, sampling parameters),
and the sampled ids that travel back, without a sync. Host arrays are numpy; no torch here."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from artifact_format.layout import ALIGN
from runtime.memory import ITEM_BYTES, NUMPY_DTYPES, Memory


def aligned(n: int, align: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


class Staged:
    """Buffers that travel host -> device together, as one copy.

    specs: name -> (shape, graph dtype). One device byte buffer holds every buffer as a typed view at a
    16-byte-aligned offset. On a GPU, a step writes one of two pinned host mirrors in turn and uploads it
    asynchronously; a mirror is rewritten only once its previous upload (two steps back) has completed, so the
    host never waits on the step just enqueued. Where the memory is the host's, the host side is the buffer.
    """

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], str]], memory: Memory):
        layout, total = {}, 0
        for name, (shape, dtype) in specs.items():
            layout[name] = (total, shape, dtype)
            total += aligned(math.prod(shape) * ITEM_BYTES[dtype])
        self.nbytes = max(total, ALIGN)
        self.memory = memory
        self.buffer = memory.alloc(self.nbytes, zero=True)
        self.views = {n: memory.view(self.buffer, o, s, dt) for n, (o, s, dt) in layout.items()}
        self._hosts = [memory.host(self.buffer)] if memory.host_visible else [memory.pinned(self.nbytes)
                                                                               for _ in range(2)]
        for h in self._hosts:
            h[:] = 0  # pinned memory comes uninitialised; the device buffer starts zeroed, so do its mirrors
        self._host_views = [{n: h[o:o + math.prod(s) * ITEM_BYTES[dt]].view(NUMPY_DTYPES[dt]).reshape(s)
                             for n, (o, s, dt) in layout.items()} for h in self._hosts]
        self._uploaded = [] if memory.host_visible else [memory.event() for _ in self._hosts]
        self._turn = 0

    def host(self) -> dict[str, np.ndarray]:
        """The host-side views to fill for the next upload, as numpy arrays (a slice write costs ~1 µs: this is on
        every step's path)."""
        if self._uploaded:
            self._turn ^= 1
            self._uploaded[self._turn].synchronize()
        return self._host_views[self._turn]

    def upload(self) -> None:
        """Enqueue the copy of what ``host()`` returned (nothing to do where the memory is the host's)."""
        if self._uploaded:
            self.memory.write(self.buffer, self._hosts[self._turn])
            self._uploaded[self._turn].record()


class PendingIds:
    """A step's sampled token ids on their way to the host: ``tokens()`` waits for them alone (an event, or
    nothing where they are already there), never for work enqueued after them.

    values: [n] int32 host array, complete once ``copied`` (an event, or None) has been reached.
    """

    def __init__(self, values: np.ndarray, copied: Any = None):
        self._values = values
        self._copied = copied
        self._ids: list[int] | None = None

    def tokens(self) -> list[int]:
        if self._ids is None:
            if self._copied is not None:
                self._copied.synchronize()
            self._ids = np.asarray(self._values).tolist()
        return self._ids
