"""Weights straight from the memory-mapped weights.safetensors into one device allocation, in large chunks.

The safetensors header gives each tensor's byte range (``Artifact.weight_ranges``, checked against the graph).
Tensors are placed in one allocation at their file offsets, shifted only where a tensor's offset is not ALIGN-aligned
(the kernels are compiled assuming 16-byte-aligned pointers), so a file of aligned tensors is one contiguous range:
a few large copies instead of one per tensor. The file is read through a memory map into two pinned buffers in turn,
each copied to the device asynchronously while the next is filled, so reading the page cache overlaps the DMA.
``upload_in_background`` runs the same on a thread of its own, so the binaries load meanwhile: ctypes and numpy's
large copies release the GIL, and the driver is thread-safe once the context is current on the worker too.
No torch, no safetensors package.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from artifact_format.layout import ALIGN
from runtime.device import Device
from runtime.memory import DeviceArray
from runtime.staging import aligned

CHUNK_BYTES = 64 << 20  # per pinned buffer: large enough for full-speed DMA, small enough to start at once


def placement(ranges: dict[str, tuple[str, tuple[int, ...], int, int]]) -> tuple[dict[str, int], int,
                                                                                  list[tuple[int, int, int]]]:
    """(name -> device offset, device bytes, segments (file begin, file end, device offset)) for tensors at file
    byte ranges ``ranges`` (name -> (dtype, shape, begin, end)): each device offset ALIGN-aligned, and
    consecutive tensors that keep one shift share a segment, copied as one range."""
    offsets: dict[str, int] = {}
    segments: list[list[int]] = []
    end_dev = 0
    for name, (_, _, begin, end) in sorted(ranges.items(), key=lambda kv: kv[1][2]):
        dev = aligned(max(end_dev, begin + (segments[-1][2] - segments[-1][0] if segments else 0)), ALIGN)
        if segments and dev - begin == segments[-1][2] - segments[-1][0] and begin >= segments[-1][1]:
            segments[-1][1] = end
        else:
            segments.append([begin, end, dev])
        offsets[name] = dev
        end_dev = dev + (end - begin)
    return offsets, end_dev, [tuple(s) for s in segments]


def upload_weights(path: Any, data_start: int, ranges: dict[str, tuple[str, tuple[int, ...], int, int]],
                   device: Device) -> tuple[dict[str, DeviceArray], int]:
    """Copy every tensor of ``ranges`` from the file at ``path`` to the device; (name -> DeviceArray, bytes).

    Returns once the copies are enqueued and the pinned buffers' last fill is on its way; the stream orders them
    before any kernel that reads the weights."""
    offsets, total, segments = placement(ranges)
    base = device.alloc(max(total, 1))
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None
    try:
        data = np.frombuffer(mm, dtype=np.uint8) if mm is not None else np.zeros(0, np.uint8)
        buffers = [device.pinned(CHUNK_BYTES) for _ in range(2)]
        copied = [device.event(), device.event()]
        used = [False, False]
        turn = 0
        for begin, end, dev in segments:
            for off in range(begin, end, CHUNK_BYTES):
                n = min(CHUNK_BYTES, end - off)
                if used[turn]:  # its previous copy must be done before it is refilled
                    copied[turn].synchronize()
                np.copyto(buffers[turn][:n], data[data_start + off:data_start + off + n])
                device.htod(base + dev + (off - begin), buffers[turn], n)
                copied[turn].record()
                used[turn] = True
                turn ^= 1
        device.synchronize()  # the pinned buffers and the map go away below
        for b in buffers:
            device.free_pinned(b)
        del data, buffers
    finally:
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view still alive (an error above holds one): the map closes when it goes
                pass
    arrays = {name: DeviceArray(base + offsets[name], shape, dtype) for name, (dtype, shape, _, _) in ranges.items()}
    return arrays, total


def upload_in_background(path: Any, data_start: int, ranges: dict[str, tuple[str, tuple[int, ...], int, int]],
                         device: Device) -> Callable[[], tuple[dict[str, DeviceArray], int]]:
    """Start ``upload_weights`` on a worker thread; returns the call that waits for it and gives its result (or
    raises what it raised)."""
    ctx = device.context()
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            device.make_current(ctx)
            result["value"] = upload_weights(path, data_start, ranges, device)
        except BaseException as e:  # handed to the waiting thread, which raises it
            result["error"] = e

    worker = threading.Thread(target=work, name="trilite-weights", daemon=True)
    worker.start()

    def wait() -> tuple[dict[str, DeviceArray], int]:
        worker.join()
        if "error" in result:
            raise result["error"]
        return result["value"]
    return wait
