"""Buffers that travel from host to device together, in one copy per step (step inputs, sampling parameters)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

ALIGN = 16  # bytes: every pointer the kernels see is 16-byte aligned (their divisibility hints assume it)


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
