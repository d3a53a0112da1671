"""A stand-in for libcuda on a machine without a GPU: the driver entry points the cuda backend calls, as real C
function pointers (ctypes callbacks with the prototypes runtime/device.py declares), over host memory.

Device memory is host memory at real addresses, copies are memmoves (the stream is trivially in order), events
and synchronisation are no-ops. Kernel launches are the one thing a CPU cannot do as a GPU would: ``Driver.launch``
is replaced by one that runs the bound launch through the Triton interpreter on torch views of that memory. Graph
capture records each launch with its scalar parameters as they were at capture (what a CUDA graph keeps), and a
graph launch replays them; a copy enqueued during capture is refused, as the backend must never make one there.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from runtime.device import ARGTYPES, CUDA_NAMES

_VP, _INT, _UINT = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
CAPTURE_UNSUPPORTED = 900  # CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED


def _put(ptr: int, value: int, ctype: type = ctypes.c_uint64) -> None:
    ctype.from_address(ptr).value = value


class FakeCuda:
    """The fake library: attribute lookup gives its functions; an entry point it lacks raises AttributeError (so
    ``getattr(lib, "cuLaunchKernelEx", None)`` finds none and the backend launches without PDL)."""

    def __init__(self, major: int = 9, minor: int = 0):
        self.cc = {75: major, 76: minor, 97: 227 * 1024}
        self.memory: dict[int, np.ndarray] = {}  # address -> the host array behind it
        self.capturing = False
        self.recorded: list = []
        self.graphs: dict[int, list] = {}
        self.counts: dict[str, int] = {}
        self._names = {b"CUDA_ERROR_FAKE": ctypes.create_string_buffer(b"CUDA_ERROR_FAKE")}
        self._handles = 0x1000
        fns = {
            "cuInit": ([_UINT], lambda flags: 0),
            "cuGetErrorName": ([_INT, _VP], self._error_name),
            "cuCtxGetCurrent": ([_VP], lambda out: _put(out, 1) or 0),
            "cuCtxSetCurrent": ([_VP], lambda ctx: 0 if ctx == 1 else 201),  # CUDA_ERROR_INVALID_CONTEXT
            "cuDeviceGet": ([_VP, _INT], lambda out, i: _put(out, 0, ctypes.c_int) or 0),
            "cuDeviceGetCount": ([_VP], lambda out: _put(out, 1, ctypes.c_int) or 0),
            "cuDeviceGetAttribute": ([_VP, _INT, _INT], lambda out, a, d: _put(out, self.cc[a], ctypes.c_int) or 0),
            "cuCtxGetDevice": ([_VP], lambda out: _put(out, 0, ctypes.c_int) or 0),
            "cuModuleLoadData": ([_VP, _VP], lambda out, image: _put(out, self._handle()) or 0),
            "cuModuleGetFunction": ([_VP, _VP, ctypes.c_char_p], lambda out, m, n: _put(out, self._handle()) or 0),
            "cuModuleUnload": ([_VP], lambda m: 0),
            "cuFuncSetAttribute": ([_VP, _INT, _INT], lambda f, a, v: 0),
            "cuLaunchKernel": ([_VP] + [_UINT] * 7 + [_VP] * 3, self._no_launch),
        }
        ours = {
            "alloc": self._alloc, "free": self._free, "host_alloc": lambda out, n, flags: self._alloc(out, n),
            "host_free": self._free, "htod": self._copy, "dtoh": self._copy, "dtod": self._copy,
            "memset": self._memset, "mem_info": self._mem_info, "stream_create": self._out_handle,
            "stream_destroy": lambda s: 0, "stream_sync": lambda s: 0, "event_create": self._out_handle,
            "event_destroy": lambda e: 0, "event_record": lambda e, s: 0, "event_sync": lambda e: 0,
            "event_elapsed": lambda out, a, b: _put(out, 0, ctypes.c_uint32) or 0,
            "begin_capture": self._begin, "end_capture": self._end, "instantiate": self._instantiate,
            "graph_launch": self._graph_launch, "graph_destroy": lambda g: 0, "exec_destroy": lambda g: 0,
        }
        for name, fn in ours.items():
            fns[CUDA_NAMES[name]] = (ARGTYPES[name], fn)
        self._fns = {}
        for symbol, (argtypes, fn) in fns.items():
            self._fns[symbol] = self._counted(symbol, ctypes.CFUNCTYPE(ctypes.c_int, *argtypes), fn)

    def _counted(self, symbol: str, proto: Any, fn: Any) -> Any:
        def call(*args):
            self.counts[symbol] = self.counts.get(symbol, 0) + 1
            rc = fn(*args)
            return 0 if rc is None else rc
        return proto(call)

    def __getattr__(self, name: str) -> Any:
        fns = self.__dict__.get("_fns", {})
        if name not in fns:
            raise AttributeError(name)
        return fns[name]

    # ----- entry points -----

    def _handle(self) -> int:
        self._handles += 16
        return self._handles

    def _out_handle(self, out: int, *_: Any) -> int:
        _put(out, self._handle())
        return 0

    def _error_name(self, code: int, out: int) -> int:
        _put(out, ctypes.addressof(self._names[b"CUDA_ERROR_FAKE"]))
        return 0

    def _no_launch(self, *args: Any) -> int:
        raise AssertionError("launches go through the patched Driver.launch")

    def _alloc(self, out: int, nbytes: int) -> int:
        buf = np.empty(nbytes + 256, dtype=np.uint8)
        buf[:] = 0xA5  # not zero: a buffer the backend reads before writing shows up as wrong numbers
        ptr = -(-buf.ctypes.data // 256) * 256  # cuMemAlloc's alignment
        self.memory[ptr] = buf
        _put(out, ptr)
        return 0

    def _free(self, ptr: int) -> int:
        return 0 if self.memory.pop(ptr, None) is not None else 1

    def _copy(self, dst: int, src: int, nbytes: int, stream: int) -> int:
        if self.capturing:
            return CAPTURE_UNSUPPORTED
        ctypes.memmove(dst, src, nbytes)
        return 0

    def _memset(self, dst: int, value: int, nbytes: int, stream: int) -> int:
        if self.capturing:
            return CAPTURE_UNSUPPORTED
        ctypes.memset(dst, value, nbytes)
        return 0

    def _mem_info(self, free: int, total: int) -> int:
        _put(free, 1 << 30, ctypes.c_size_t)
        _put(total, 2 << 30, ctypes.c_size_t)
        return 0

    def _begin(self, stream: int, mode: int) -> int:
        self.capturing, self.recorded = True, []
        return 0

    def _end(self, stream: int, out: int) -> int:
        self.capturing = False
        handle = self._handle()
        self.graphs[handle] = self.recorded
        _put(out, handle)
        return 0

    def _instantiate(self, out: int, graph: int, flags: int) -> int:
        handle = self._handle()
        self.graphs[handle] = list(self.graphs[graph])
        _put(out, handle)
        return 0

    def _graph_launch(self, exe: int, stream: int) -> int:
        for run in self.graphs[exe]:
            run()
        return 0


def torch_view(array: Any) -> Any:
    """A torch tensor over a DeviceArray's (host) memory."""
    import torch

    from runtime.backends.torch_memory import TORCH_DTYPES

    dtype = TORCH_DTYPES[array.dtype]
    if array.nbytes == 0:
        return torch.empty(array.shape, dtype=dtype)
    raw = (ctypes.c_uint8 * array.nbytes).from_address(array.ptr)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(array.shape)


def install(monkeypatch: Any, fake: FakeCuda) -> dict:
    """Route runtime.driver / runtime.device to ``fake`` and make Driver.launch interpret; returns the registry the
    launch consults: id(ParamArray) -> the backend's _Site, filled by ``register(backend)``."""
    import runtime.device
    import runtime.driver
    from kernels.spec import interpreted, interpreting
    from runtime.backends.interpret import kernel_of

    sites: dict[int, Any] = {}
    monkeypatch.setattr(runtime.driver, "_open", lambda names: fake)
    monkeypatch.setattr(runtime.device, "_open", lambda names: fake)

    def launch(self, kernel, grid, params, stream):
        """Run the site's Triton kernel on ``grid`` with the parameter values of ``params`` as they are now."""
        b = sites[id(params)].launch
        args = {p.name: torch_view(p.value) if p.kind == "tensor" else params.get(i) if p.kind == "sym" else p.value
                for i, p in enumerate(b.params)}
        constexprs = {**dict(b.binary.constexprs), "USE_PDL": False} if "USE_PDL" in dict(b.binary.constexprs) \
            else dict(b.binary.constexprs)
        fn = kernel_of(b.binary.module, b.binary.kernel).fn

        def run():
            with interpreting():
                interpreted(fn)[tuple(grid)](**args, **constexprs)
        if fake.capturing:
            fake.recorded.append(run)  # the scalars as they are now: a graph keeps its kernels' parameters
        else:
            run()

    monkeypatch.setattr(runtime.driver.Driver, "launch", launch)
    return sites


def register(sites: dict, backend: Any) -> None:
    for site in backend._sites:
        sites[id(site.params)] = site
