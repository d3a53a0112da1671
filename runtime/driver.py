"""The GPU driver API through ctypes: load ahead-of-time binaries and launch them, with no Triton and no compiler.

One ``Driver`` wraps either the CUDA driver (libcuda.so.1: cuModuleLoadData, cuModuleGetFunction,
cuFuncSetAttribute, cuLaunchKernel) or the HIP runtime's module API (libamdhip64.so: hipModuleLoadData,
hipModuleGetFunction, hipModuleLaunchKernel), which take the same arguments in the same order.

Launch convention of a Triton 3.6 kernel: its non-constexpr parameters in signature order, then two more
pointers (global scratch, profile scratch), each passed by address in a ``void**`` array. A ``ParamArray``
holds that array and the ctypes objects it points at, built once per launch site: with a static memory
plan every pointer is fixed, so a step only rewrites the few scalars that change (T, S) in place and a
launch is one foreign call (about 6.5 µs from Python on an H100, against 22 µs through Triton's launcher).
Every call's status is checked and a failure raises ``DriverError`` with the driver's error name.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

# Scalar parameter types of a Triton signature -> the ctypes type the kernel's ABI expects.
# Pointers are CUdeviceptr / hipDeviceptr_t, 64-bit unsigned.
SCALAR_CTYPES: dict[str, type] = {
    "i1": ctypes.c_int8, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32,
    "i64": ctypes.c_int64, "u1": ctypes.c_uint8, "u8": ctypes.c_uint8, "u16": ctypes.c_uint16,
    "u32": ctypes.c_uint32, "u64": ctypes.c_uint64, "fp32": ctypes.c_float, "f32": ctypes.c_float,
    "fp64": ctypes.c_double,
}
SHARED_STATIC_LIMIT = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union (here its first int)."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig, the first argument of cuLaunchKernelEx."""

    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


class DriverError(RuntimeError):
    """A driver call returned an error; the message names the call and the driver's error name."""


@dataclass(frozen=True)
class _Api:
    """Entry-point names of one driver library; CUDA's and HIP's module APIs line up one to one."""

    platform: str
    libraries: tuple[str, ...]
    init: str
    load: str
    unload: str
    function: str
    launch: str
    error_name: str
    error_name_returns_string: bool  # hipGetErrorName returns the string, cuGetErrorName writes it out


CUDA_API = _Api("cuda", ("libcuda.so.1", "libcuda.so"), "cuInit", "cuModuleLoadData", "cuModuleUnload",
                "cuModuleGetFunction", "cuLaunchKernel", "cuGetErrorName", False)
HIP_API = _Api("hip", ("libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.7"), "hipInit", "hipModuleLoadData",
               "hipModuleUnload", "hipModuleGetFunction", "hipModuleLaunchKernel", "hipGetErrorName", True)


class ParamArray:
    """A kernel's ``void**`` argument array plus the ctypes values it points at, which it keeps alive.

    types: the non-constexpr parameter types in order ("*fp16", "i32", "i64", "fp32", ...); values: a device
    address (int) for each pointer, a number for each scalar. The two Triton 3.6 scratch pointers follow.
    """

    def __init__(self, types: Sequence[str], values: Sequence[int | float], global_scratch: int = 0,
                 profile_scratch: int = 0):
        if len(types) != len(values):
            raise ValueError(f"{len(types)} parameter types but {len(values)} values")
        slots: list[ctypes._SimpleCData] = []
        for ty, value in zip(types, values):
            if ty.startswith("*"):
                slots.append(ctypes.c_uint64(int(value)))
            elif ty in SCALAR_CTYPES:
                slots.append(SCALAR_CTYPES[ty](value))
            else:
                raise ValueError(f"kernel parameter type {ty!r} cannot be passed by this driver")
        slots.append(ctypes.c_uint64(global_scratch))
        slots.append(ctypes.c_uint64(profile_scratch))
        self._slots = slots
        # The array stores addresses of the slots: they never move, so it stays valid while self lives.
        self.array = (ctypes.c_void_p * len(slots))(*(ctypes.addressof(s) for s in slots))

    def __len__(self) -> int:
        return len(self._slots)

    def set(self, index: int, value: int | float) -> None:
        """Rewrite parameter ``index`` in place (the array itself is unchanged)."""
        self._slots[index].value = value

    def get(self, index: int) -> int | float:
        return self._slots[index].value


@dataclass(frozen=True)
class Kernel:
    """A loaded kernel entry: its function handle and launch shape (threads per block, dynamic shared bytes)."""

    name: str
    function: int
    threads: int
    shared: int
    pdl: bool = False  # launched with programmatic dependent launch (its binary waits with gdc_wait)


class Driver:
    """Loads binaries into the current context and launches them on a given stream.

    The caller (torch) owns the context and the memory; this class only loads modules and launches.
    """

    def __init__(self, api: _Api = CUDA_API, device: int = 0):
        self.api = api
        self.lib = _open(api.libraries)
        self._modules: list[ctypes.c_void_p] = []
        self._launch = getattr(self.lib, api.launch)
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p]
        if api.error_name_returns_string:
            getattr(self.lib, api.error_name).restype = ctypes.c_char_p
        self._launch_ex = None
        if api.platform == "cuda":
            # Programmatic dependent launch (sm_90): cuLaunchKernelEx with the programmatic-stream-serialization
            # attribute, as Triton's own launcher does for launch_pdl. One config is reused: launches come from
            # one thread, and the driver reads it during the call only.
            self._launch_ex = getattr(self.lib, "cuLaunchKernelEx", None)  # absent before CUDA 11.8: no PDL
        if self._launch_ex is not None:
            self._launch_ex.restype = ctypes.c_int
            self._launch_ex.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_void_p]
            self._pdl_attr = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            self._pdl_config = _LaunchConfig(blockDimY=1, blockDimZ=1, attrs=ctypes.pointer(self._pdl_attr),
                                             numAttrs=1)
        self.check(getattr(self.lib, api.init)(0), api.init)
        if api.platform == "cuda":
            self._bind_context(device)

    @property
    def supports_pdl(self) -> bool:
        """Whether kernels can be launched with programmatic dependent launch here (cuLaunchKernelEx, CUDA)."""
        return self._launch_ex is not None

    def _bind_context(self, device: int) -> None:
        """Make the device's primary context (the one torch uses) current on this thread if none is."""
        ctx = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if ctx.value:
            return
        handle = ctypes.c_int()
        self.check(self.lib.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), handle), "cuDevicePrimaryCtxRetain")
        self.check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def error_name(self, code: int) -> str:
        fn = getattr(self.lib, self.api.error_name)
        if self.api.error_name_returns_string:
            name = fn(code)
        else:
            out = ctypes.c_char_p()
            name = out.value if fn(code, ctypes.byref(out)) == 0 else None
        return name.decode() if name else f"error {code}"

    def check(self, code: int, call: str) -> None:
        if code != 0:
            raise DriverError(f"{call} failed: {self.error_name(code)} ({code})")

    def load(self, image: bytes, name: str, num_warps: int, shared: int, warp_size: int = 32,
             pdl: bool = False) -> Kernel:
        """Load one binary (cubin / hsaco bytes) and look up its entry ``name``; ``pdl``: launch it with
        programmatic dependent launch (CUDA only: the binary must wait with gdc_wait before reading inputs)."""
        if pdl and self._launch_ex is None:
            raise DriverError(f"kernel {name} uses programmatic dependent launch, which {self.api.platform} "
                              f"does not have: recompile the artifact for this GPU's target")
        module = ctypes.c_void_p()
        # The driver reads the image during the call only; the bytes object keeps it alive until then.
        self.check(getattr(self.lib, self.api.load)(ctypes.byref(module), ctypes.c_char_p(image)),
                   f"{self.api.load}({name})")
        self._modules.append(module)
        function = ctypes.c_void_p()
        self.check(getattr(self.lib, self.api.function)(ctypes.byref(function), module, name.encode()),
                   f"{self.api.function}({name})")
        if shared > SHARED_STATIC_LIMIT and self.api.platform == "cuda":
            self._allow_shared(function, shared, name)
        return Kernel(name, function.value, num_warps * warp_size, shared, pdl)

    def _allow_shared(self, function: ctypes.c_void_p, shared: int, name: str) -> None:
        """Kernels asking for more than 48 KB of shared memory must raise their dynamic limit first."""
        device, optin = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cuCtxGetDevice(ctypes.byref(device)), "cuCtxGetDevice")
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(optin),
                                                 _CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device),
                   "cuDeviceGetAttribute")
        if shared > optin.value:
            raise DriverError(f"kernel {name} needs {shared} bytes of shared memory, this GPU allows "
                              f"{optin.value}: recompile the artifact for this GPU's target")
        self.check(self.lib.cuFuncSetAttribute(function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                               ctypes.c_int(shared)), f"cuFuncSetAttribute({name})")

    def launch(self, kernel: Kernel, grid: tuple[int, int, int], params: ParamArray, stream: int) -> None:
        """Enqueue ``kernel`` on ``stream`` (a CUstream / hipStream_t handle as int, 0 = default stream)."""
        if kernel.pdl:
            cfg = self._pdl_config
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
            cfg.blockDimX, cfg.sharedMemBytes, cfg.hStream = kernel.threads, kernel.shared, stream
            rc = self._launch_ex(ctypes.byref(cfg), kernel.function, params.array, None)
        else:
            rc = self._launch(kernel.function, grid[0], grid[1], grid[2], kernel.threads, 1, 1, kernel.shared,
                              stream, params.array, None)
        if rc != 0:
            raise DriverError(f"{self.api.launch}({kernel.name}, grid={grid}) failed: {self.error_name(rc)} ({rc})")

    def close(self) -> None:
        """Unload every module this driver loaded; its kernels must not be launched afterwards."""
        unload = getattr(self.lib, self.api.unload)
        while self._modules:
            self.check(unload(self._modules.pop()), self.api.unload)


def _open(names: Sequence[str]) -> ctypes.CDLL:
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise DriverError(f"cannot load the GPU driver library ({', '.join(names)}): {'; '.join(errors)}")
