"""Device memory, pinned host memory, copies, a stream, events and graphs through the driver API, with no torch.

What the cuda backend needs besides loading and launching kernels (runtime/driver.py), over the same library:
libcuda's ``cuMemAlloc``, ``cuMemHostAlloc``, ``cuMemcpy*Async``, ``cuMemsetD8Async``, ``cuStreamBeginCapture`` /
``cuStreamEndCapture``, ``cuGraphInstantiateWithFlags``, ``cuGraphLaunch``, ``cuMemGetInfo``, or the HIP runtime's
functions of the same arguments in the same order (``HIP_NAMES``). Every call is checked (``DriverError``).
Everything is enqueued on one stream of the device's own (non-blocking, so it never serialises with the legacy
default stream), which is also the stream graphs are captured on.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from runtime.driver import CUDA_API, Driver, DriverError, _open
from runtime.memory import NUMPY_DTYPES, DeviceArray, Memory

_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_STREAM_NON_BLOCKING = 1
_EVENT_DISABLE_TIMING = 2
# Thread-local capture: work other threads enqueue meanwhile is not refused (global mode would) nor captured.
_CAPTURE_MODE_THREAD_LOCAL = 1
ALLOC_ALIGN = 256  # cuMemAlloc's own alignment; buffers carved out of one allocation keep it

# Our name -> libcuda's exported symbol (the _v2 ABI where the header maps to it) and HIP's.
CUDA_NAMES = {
    "alloc": "cuMemAlloc_v2", "free": "cuMemFree_v2", "host_alloc": "cuMemHostAlloc", "host_free": "cuMemFreeHost",
    "htod": "cuMemcpyHtoDAsync_v2", "dtoh": "cuMemcpyDtoHAsync_v2", "dtod": "cuMemcpyDtoDAsync_v2",
    "memset": "cuMemsetD8Async", "mem_info": "cuMemGetInfo_v2", "stream_create": "cuStreamCreate",
    "stream_destroy": "cuStreamDestroy_v2", "stream_sync": "cuStreamSynchronize", "event_create": "cuEventCreate",
    "event_destroy": "cuEventDestroy_v2", "event_record": "cuEventRecord", "event_sync": "cuEventSynchronize",
    "event_elapsed": "cuEventElapsedTime", "begin_capture": "cuStreamBeginCapture_v2",
    "end_capture": "cuStreamEndCapture", "instantiate": "cuGraphInstantiateWithFlags", "graph_launch": "cuGraphLaunch",
    "graph_destroy": "cuGraphDestroy", "exec_destroy": "cuGraphExecDestroy",
}
HIP_NAMES = {
    "alloc": "hipMalloc", "free": "hipFree", "host_alloc": "hipHostMalloc", "host_free": "hipHostFree",
    "htod": "hipMemcpyHtoDAsync", "dtoh": "hipMemcpyDtoHAsync", "dtod": "hipMemcpyDtoDAsync",
    "memset": "hipMemsetD8Async", "mem_info": "hipMemGetInfo", "stream_create": "hipStreamCreateWithFlags",
    "stream_destroy": "hipStreamDestroy", "stream_sync": "hipStreamSynchronize",
    "event_create": "hipEventCreateWithFlags", "event_destroy": "hipEventDestroy", "event_record": "hipEventRecord",
    "event_sync": "hipEventSynchronize", "event_elapsed": "hipEventElapsedTime",
    "begin_capture": "hipStreamBeginCapture", "end_capture": "hipStreamEndCapture",
    "instantiate": "hipGraphInstantiateWithFlags", "graph_launch": "hipGraphLaunch", "graph_destroy": "hipGraphDestroy",
    "exec_destroy": "hipGraphExecDestroy",
}
_VP, _U64, _SZ = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t
ARGTYPES = {  # pointers to out-parameters are passed as byref, i.e. c_void_p-compatible
    "alloc": [_VP, _SZ], "free": [_U64], "host_alloc": [_VP, _SZ, ctypes.c_uint], "host_free": [_VP],
    "htod": [_U64, _VP, _SZ, _VP], "dtoh": [_VP, _U64, _SZ, _VP], "dtod": [_U64, _U64, _SZ, _VP],
    "memset": [_U64, ctypes.c_ubyte, _SZ, _VP], "mem_info": [_VP, _VP], "stream_create": [_VP, ctypes.c_uint],
    "stream_destroy": [_VP], "stream_sync": [_VP], "event_create": [_VP, ctypes.c_uint], "event_destroy": [_VP],
    "event_record": [_VP, _VP], "event_sync": [_VP], "event_elapsed": [_VP, _VP, _VP],
    "begin_capture": [_VP, ctypes.c_int], "end_capture": [_VP, _VP], "instantiate": [_VP, _VP, ctypes.c_ulonglong],
    "graph_launch": [_VP, _VP], "graph_destroy": [_VP], "exec_destroy": [_VP],
}


class Device:
    """One GPU's memory, stream, events and graphs, over a ``Driver``'s library and context."""

    def __init__(self, driver: Driver):
        self.driver = driver
        names = CUDA_NAMES if driver.api.platform == "cuda" else HIP_NAMES
        self._fn = {}
        for ours, symbol in names.items():
            fn = getattr(driver.lib, symbol)
            fn.restype, fn.argtypes = ctypes.c_int, ARGTYPES[ours]
            self._fn[ours] = (fn, symbol)
        self._allocs: list[int] = []
        self._pinned: list[int] = []
        stream = ctypes.c_void_p()
        self._call("stream_create", ctypes.byref(stream), _STREAM_NON_BLOCKING)
        self.stream = stream.value or 0

    def _call(self, name: str, *args: Any) -> None:
        fn, symbol = self._fn[name]
        self.driver.check(fn(*args), symbol)

    # ----- memory -----

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._call("alloc", ctypes.byref(ptr), max(int(nbytes), 1))
        self._allocs.append(ptr.value)
        return ptr.value

    def free(self, ptr: int) -> None:
        """Free one allocation of ``alloc`` now (the stream must be done with it)."""
        self._allocs.remove(ptr)
        self._call("free", ptr)

    def pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 array (freed with the Device: keep no view beyond it)."""
        ptr = ctypes.c_void_p()
        self._call("host_alloc", ctypes.byref(ptr), max(int(nbytes), 1), 0)
        self._pinned.append(ptr.value)
        return np.ctypeslib.as_array((ctypes.c_uint8 * max(int(nbytes), 1)).from_address(ptr.value))[:nbytes]

    def free_pinned(self, array: np.ndarray) -> None:
        """Free pinned memory from ``pinned`` now (no copy may still read it; drop every view of it)."""
        ptr = array.ctypes.data
        self._pinned.remove(ptr)
        self._call("host_free", ptr)

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._call("mem_info", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def htod(self, dst: int, src: np.ndarray, nbytes: int | None = None) -> None:
        """Enqueue a host-to-device copy; asynchronous for pinned ``src`` (pageable memory is staged by the
        driver before the call returns)."""
        n = src.nbytes if nbytes is None else nbytes
        if n:
            self._call("htod", dst, src.ctypes.data, n, self.stream)

    def dtoh(self, dst: np.ndarray, src: int, nbytes: int | None = None) -> None:
        n = dst.nbytes if nbytes is None else nbytes
        if n:
            self._call("dtoh", dst.ctypes.data, src, n, self.stream)

    def dtod(self, dst: int, src: int, nbytes: int) -> None:
        if nbytes:
            self._call("dtod", dst, src, nbytes, self.stream)

    def memset(self, dst: int, value: int, nbytes: int) -> None:
        if nbytes:
            self._call("memset", dst, value, nbytes, self.stream)

    def synchronize(self) -> None:
        self._call("stream_sync", self.stream)

    def context(self) -> int:
        """The context current on this thread (the device's primary one, which Driver made current)."""
        ctx = ctypes.c_void_p()
        symbol = "cuCtxGetCurrent" if self.driver.api.platform == "cuda" else "hipCtxGetCurrent"
        self.driver.check(getattr(self.driver.lib, symbol)(ctypes.byref(ctx)), symbol)
        return ctx.value or 0

    def make_current(self, ctx: int) -> None:
        """Make ``ctx`` current on the calling thread (a context is current per thread: a worker must set it)."""
        symbol = "cuCtxSetCurrent" if self.driver.api.platform == "cuda" else "hipCtxSetCurrent"
        self.driver.check(getattr(self.driver.lib, symbol)(ctypes.c_void_p(ctx)), symbol)

    # ----- events and graphs -----

    def event(self, timing: bool = False) -> Event:
        return Event(self, timing)

    def begin_capture(self) -> None:
        self._call("begin_capture", self.stream, _CAPTURE_MODE_THREAD_LOCAL)

    def end_capture(self) -> Graph:
        """Stop capturing and instantiate what was captured as one executable graph."""
        graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
        self._call("end_capture", self.stream, ctypes.byref(graph))
        try:
            self._call("instantiate", ctypes.byref(exe), graph, 0)
        finally:
            self._call("graph_destroy", graph)  # the executable graph keeps what it needs
        return Graph(self, exe.value)

    def close(self) -> None:
        """Wait for the stream, then free every allocation, pinned buffer and the stream."""
        self.synchronize()
        while self._allocs:
            self._call("free", self._allocs.pop())
        while self._pinned:
            self._call("host_free", self._pinned.pop())
        self._call("stream_destroy", self.stream)


class Event:
    """An event on the Device's stream: ``record()`` marks the work enqueued so far, ``synchronize()`` waits for
    it (only for it, never for later work)."""

    def __init__(self, device: Device, timing: bool = False):
        self.device = device
        handle = ctypes.c_void_p()
        device._call("event_create", ctypes.byref(handle), 0 if timing else _EVENT_DISABLE_TIMING)
        self.handle = handle.value

    def record(self) -> None:
        self.device._call("event_record", self.handle, self.device.stream)

    def synchronize(self) -> None:
        self.device._call("event_sync", self.handle)

    def seconds_since(self, start: Event) -> float:
        ms = ctypes.c_float()
        self.device._call("event_elapsed", ctypes.byref(ms), start.handle, self.handle)
        return ms.value / 1e3


class Graph:
    """An instantiated graph; ``launch()`` replays it on the Device's stream."""

    def __init__(self, device: Device, handle: int):
        self.device, self.handle = device, handle

    def launch(self) -> None:
        self.device._call("graph_launch", self.handle, self.device.stream)

    def destroy(self) -> None:
        if self.handle:
            self.device._call("exec_destroy", self.handle)
            self.handle = 0


class DeviceMemory(Memory):
    """``runtime.memory.Memory`` over a Device: DeviceArrays, copies on its stream, pinned mirrors and events."""

    def __init__(self, device: Device):
        self.device = device

    def alloc(self, nbytes: int, zero: bool = False) -> DeviceArray:
        buf = DeviceArray(self.device.alloc(nbytes), (nbytes,), "u8")
        if zero:
            self.device.memset(buf.ptr, 0, nbytes)
        return buf

    def view(self, buf: DeviceArray, offset: int, shape: tuple[int, ...], dtype: str) -> DeviceArray:
        return DeviceArray(buf.ptr + offset, shape, dtype)

    def dtype_of(self, array: DeviceArray) -> str:
        return array.dtype

    def write(self, dst: DeviceArray, src: np.ndarray) -> None:
        src = np.ascontiguousarray(src)
        if src.nbytes != dst.nbytes:
            raise ValueError(f"copying {src.nbytes} host bytes into a {dst.nbytes}-byte device buffer")
        self.device.htod(dst.ptr, src)

    def read(self, src: DeviceArray) -> np.ndarray:
        out = np.empty(src.shape, dtype=NUMPY_DTYPES[src.dtype])
        self.device.dtoh(out, src.ptr, src.nbytes)
        self.device.synchronize()
        return out

    def copy(self, dst: DeviceArray, src: DeviceArray) -> None:
        self.device.dtod(dst.ptr, src.ptr, min(dst.nbytes, src.nbytes))

    def free(self, ptr: int) -> None:
        """Free one allocation of ``alloc`` now (the stream must be done with it)."""
        self._allocs.remove(ptr)
        self._call("free", ptr)

    def pinned(self, nbytes: int) -> np.ndarray:
        return self.device.pinned(nbytes)

    def event(self) -> Event:
        return self.device.event()


def device_count(driver: Driver) -> int:
    count = ctypes.c_int()
    symbol = "cuDeviceGetCount" if driver.api.platform == "cuda" else "hipGetDeviceCount"
    driver.check(getattr(driver.lib, symbol)(ctypes.byref(count)), symbol)
    return count.value


def compute_capability(driver: Driver, ordinal: int = 0) -> tuple[int, int]:
    """(major, minor) of CUDA device ``ordinal``."""
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    driver.check(driver.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
    for out, attr in ((major, _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                      (minor, _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)):
        driver.check(driver.lib.cuDeviceGetAttribute(ctypes.byref(out), attr, dev), "cuDeviceGetAttribute")
    return major.value, minor.value



def cuda_target() -> str | None:
    """The first CUDA GPU as an artifact target ("cuda:90"), or None where there is no driver or no GPU.

    Asks libcuda directly (cuInit, cuDeviceGetCount, cuDeviceGetAttribute): no context is created, nothing loaded.
    """
    try:
        lib = _open(CUDA_API.libraries)
    except DriverError:
        return None
    count, dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    if lib.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        return None
    for out, attr in ((major, _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                      (minor, _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)):
        if lib.cuDeviceGetAttribute(ctypes.byref(out), attr, dev) != 0:
            return None
    return f"cuda:{major.value}{minor.value}"
