"""Buffers that travel from host to device together, in one copy per step (step inputs, sampling parameters),
and the sampled ids that travel back, without a sync."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from artifact_format.layout import ALIGN


def aligned(n: int, align: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


class Staged:
    """Buffers that travel host -> device together, as one copy.

    One device byte buffer holds every buffer as a typed view at a 16-byte-aligned offset. On a GPU, a step
    writes one of two pinned host mirrors in turn and uploads it asynchronously; a mirror is rewritten only once
    its previous upload (two steps back) has completed, so the host never waits on the step just enqueued.
    On the CPU the host side is the device buffer itself.
    """

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device):
        layout, total = {}, 0
        for name, (shape, dtype) in specs.items():
            layout[name] = (total, shape, dtype)
            total += aligned(math.prod(shape) * dtype.itemsize)
        self.buffer = torch.zeros(max(total, ALIGN), dtype=torch.uint8, device=device)
        self.views = self._split(self.buffer, layout)
        gpu = device.type == "cuda"
        self._hosts = [torch.zeros_like(self.buffer, device="cpu").pin_memory() for _ in range(2)] if gpu \
            else [self.buffer]
        self._host_views = [{n: v.numpy() for n, v in self._split(h, layout).items()} for h in self._hosts]
        self._uploaded = [torch.cuda.Event() for _ in self._hosts] if gpu else []
        self._turn = 0

    @staticmethod
    def _split(buffer: Tensor, layout: dict) -> dict[str, Tensor]:
        return {n: buffer[o:o + math.prod(s) * dt.itemsize].view(dt).view(s) for n, (o, s, dt) in layout.items()}

    def host(self) -> dict[str, np.ndarray]:
        """The host-side views to fill for the next upload, as numpy arrays (a slice write costs ~1 µs, a
        torch one several: this is on every step's path)."""
        if self._uploaded:
            self._turn ^= 1
            self._uploaded[self._turn].synchronize()
        return self._host_views[self._turn]

    def upload(self) -> None:
        """Enqueue the copy of what ``host()`` returned on the current stream (nothing to do on the CPU)."""
        if self._uploaded:
            self.buffer.copy_(self._hosts[self._turn], non_blocking=True)
            self._uploaded[self._turn].record()


class PendingIds:
    """A step's sampled token ids on their way to the host: ``tokens()`` waits for them alone (an event, or
    nothing on the CPU), never for work enqueued after them."""

    def __init__(self, values: Tensor, copied: torch.cuda.Event | None = None):
        self._values = values
        self._copied = copied
        self._ids: list[int] | None = None

    def tokens(self) -> list[int]:
        if self._ids is None:
            if self._copied is not None:
                self._copied.synchronize()
            self._ids = self._values.tolist()
        return self._ids


class Readback:
    """Device int32 rows copied into pinned host memory without a sync: a ring of ``depth`` pinned buffers.

    The engine reads step N's ids while step N+1 runs, so two buffers are in use at a time; a third spares the
    wait. A buffer is reused only after its ids were taken (reused early, they are taken then, which waits).
    """

    def __init__(self, rows: int, depth: int = 3):
        self._hosts = [torch.zeros(rows, dtype=torch.int32).pin_memory() for _ in range(depth)]
        self._events = [torch.cuda.Event() for _ in range(depth)]
        self._owners: list[PendingIds | None] = [None] * depth
        self._turn = 0

    def copy(self, src: Tensor) -> PendingIds:
        """Enqueue the copy of ``src`` ([n] int32 on the GPU) on the current stream."""
        k = self._turn
        self._turn = (k + 1) % len(self._hosts)
        if self._owners[k] is not None:
            self._owners[k].tokens()
        host = self._hosts[k][:src.shape[0]]
        host.copy_(src, non_blocking=True)
        self._events[k].record()
        self._owners[k] = PendingIds(host, self._events[k])
        return self._owners[k]
