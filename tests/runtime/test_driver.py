"""runtime.driver without a GPU: the parameter array's memory layout, and the call sequence against a fake libcuda.

The real launches are checked on the GPU (tests/gpu/test_driver_gpu.py); here a fake library records what the
driver passes, so argument order, block size, the shared-memory opt-in and error reporting are pinned down.
"""

import ctypes
import struct

import pytest

from runtime import driver as drv
from runtime.driver import CUDA_API, HIP_API, Driver, DriverError, ParamArray


def _read(array: ParamArray, i: int, ctype: type) -> int | float:
    return ctypes.cast(array.array[i], ctypes.POINTER(ctype)).contents.value


def test_param_array_holds_each_value_in_its_abi_type():
    types = ["*fp16", "i32", "i64", "fp32", "*i32", "u8"]
    values = [0xDEAD_BEEF_0000, -7, 2**40 + 3, 1.5, 16, 255]
    p = ParamArray(types, values, global_scratch=0x1000, profile_scratch=0)
    assert len(p) == 8  # six parameters, then Triton 3.6's two scratch pointers
    assert _read(p, 0, ctypes.c_uint64) == 0xDEAD_BEEF_0000
    assert _read(p, 1, ctypes.c_int32) == -7
    assert _read(p, 2, ctypes.c_int64) == 2**40 + 3
    raw = ctypes.string_at(p.array[3], 4)
    assert struct.unpack("<f", raw)[0] == 1.5  # fp32 scalars are 4-byte floats, not doubles
    assert _read(p, 4, ctypes.c_uint64) == 16 and _read(p, 5, ctypes.c_uint8) == 255
    assert _read(p, 6, ctypes.c_uint64) == 0x1000 and _read(p, 7, ctypes.c_uint64) == 0


def test_param_array_updates_scalars_in_place():
    p = ParamArray(["i32", "*fp32"], [1, 64])
    address = p.array[0]
    p.set(0, 123)
    assert p.array[0] == address and _read(p, 0, ctypes.c_int32) == 123 and p.get(0) == 123


def test_param_array_rejects_what_it_cannot_pass():
    with pytest.raises(ValueError, match="bf16"):
        ParamArray(["bf16"], [1.0])
    with pytest.raises(ValueError, match="2 parameter types but 1 values"):
        ParamArray(["i32", "i32"], [1])


class FakeCuda:
    """Just enough of libcuda: records calls, fills out-parameters, fails where told to."""

    def __init__(self, fail: dict[str, int] | None = None):
        self.calls: list[tuple] = []
        self.fail = fail or {}
        names = ("cuInit", "cuCtxGetCurrent", "cuModuleLoadData", "cuModuleGetFunction", "cuLaunchKernel",
                 "cuGetErrorName", "cuCtxGetDevice", "cuDeviceGetAttribute", "cuFuncSetAttribute", "cuModuleUnload",
                 "cuLaunchKernelEx")
        for name in names:
            setattr(self, name, self._fn(name))

    def _fn(self, name: str):
        def call(*args):
            self.calls.append((name, args))
            out = {"cuCtxGetCurrent": 77, "cuModuleLoadData": 11, "cuModuleGetFunction": 22, "cuCtxGetDevice": 0,
                   "cuDeviceGetAttribute": 227 * 1024, "cuGetErrorName": b"CUDA_ERROR_INVALID_VALUE"}
            if name in out and args and hasattr(args[0], "_obj"):
                args[0]._obj.value = out[name]
            if name == "cuGetErrorName":
                args[1]._obj.value = out[name]
            return self.fail.get(name, 0)

        return call


def _driver(monkeypatch, fake: FakeCuda, api=CUDA_API) -> Driver:
    monkeypatch.setattr(drv, "_open", lambda names: fake)
    return Driver(api)


def test_load_and_launch_call_sequence(monkeypatch):
    fake = FakeCuda()
    d = _driver(monkeypatch, fake)
    k = d.load(b"cubin bytes", "_rms_norm_kernel", num_warps=4, shared=96 * 1024)
    assert (k.function, k.threads, k.shared) == (22, 128, 96 * 1024)
    names = [c[0] for c in fake.calls]
    assert names[:4] == ["cuInit", "cuCtxGetCurrent", "cuModuleLoadData", "cuModuleGetFunction"]
    # more than 48 KB: the kernel opts in to that much dynamic shared memory
    (attr,) = [c for c in fake.calls if c[0] == "cuFuncSetAttribute"]
    assert attr[1][1] == 8 and attr[1][2].value == 96 * 1024
    params = ParamArray(["i32"], [5])
    d.launch(k, (3, 2, 1), params, stream=0xABC)
    f, gx, gy, gz, bx, by, bz, shared, stream, array, extra = fake.calls[-1][1]
    assert (f, gx, gy, gz, bx, by, bz, shared, stream) == (22, 3, 2, 1, 128, 1, 1, 96 * 1024, 0xABC)
    assert array is params.array and extra is None


def test_small_shared_memory_needs_no_opt_in(monkeypatch):
    fake = FakeCuda()
    _driver(monkeypatch, fake).load(b"x", "k", num_warps=8, shared=16)
    assert "cuFuncSetAttribute" not in [c[0] for c in fake.calls]


def test_errors_name_the_call_and_the_driver_error(monkeypatch):
    fake = FakeCuda(fail={"cuLaunchKernel": 1})
    d = _driver(monkeypatch, fake)
    k = d.load(b"x", "my_kernel", num_warps=1, shared=0)
    with pytest.raises(DriverError, match=r"cuLaunchKernel\(my_kernel, grid=\(1, 1, 1\)\) failed: "
                                          r"CUDA_ERROR_INVALID_VALUE \(1\)"):
        d.launch(k, (1, 1, 1), ParamArray([], []), 0)
    fake = FakeCuda(fail={"cuModuleLoadData": 200})
    with pytest.raises(DriverError, match=r"cuModuleLoadData\(k\) failed"):
        _driver(monkeypatch, fake).load(b"x", "k", 1, 0)


def test_launch_structs_have_cuda_headers_layout():
    """CUlaunchAttribute: id, pad to 8, a 64-byte value union; CUlaunchConfig: 7 uints, then stream, attrs, count
    at 8-byte alignment (cuda.h, CUDA 12)."""
    assert ctypes.sizeof(drv._LaunchAttribute) == 72 and drv._LaunchAttribute.value.offset == 8
    cfg = drv._LaunchConfig
    assert (cfg.sharedMemBytes.offset, cfg.hStream.offset, cfg.attrs.offset, cfg.numAttrs.offset) == (24, 32, 40, 48)
    assert ctypes.sizeof(cfg) == 56


def test_pdl_kernels_launch_through_cuLaunchKernelEx_with_the_attribute(monkeypatch):
    fake = FakeCuda()
    d = _driver(monkeypatch, fake)
    plain = d.load(b"x", "plain", num_warps=4, shared=0)
    pdl = d.load(b"x", "pdl", num_warps=8, shared=4096, pdl=True)
    assert pdl.pdl and not plain.pdl
    params = ParamArray(["i32"], [5])
    d.launch(pdl, (7, 3, 1), params, stream=0xABC)
    name, (cfg_ref, function, array, extra) = fake.calls[-1]
    cfg = cfg_ref._obj
    assert name == "cuLaunchKernelEx" and function == 22 and array is params.array and extra is None
    dims = (cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ, cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ)
    assert dims == (7, 3, 1, 256, 1, 1)
    assert (cfg.sharedMemBytes, cfg.hStream, cfg.numAttrs) == (4096, 0xABC, 1)
    assert (cfg.attrs[0].id, cfg.attrs[0].value) == (6, 1)  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    d.launch(plain, (1, 1, 1), params, stream=0)
    assert fake.calls[-1][0] == "cuLaunchKernel"


def test_pdl_needs_cuLaunchKernelEx(monkeypatch):
    fake = FakeCuda()
    assert _driver(monkeypatch, fake).supports_pdl  # what the cuda backend's default (PDL on) asks first
    del fake.cuLaunchKernelEx
    d = _driver(monkeypatch, fake)
    assert not d.supports_pdl
    with pytest.raises(DriverError, match="programmatic dependent launch"):
        d.load(b"x", "k", 1, 0, pdl=True)


def test_hip_api_shares_the_sequence(monkeypatch):
    fake = FakeCuda()
    for cu, hip in (("cuInit", "hipInit"), ("cuModuleLoadData", "hipModuleLoadData"),
                    ("cuModuleGetFunction", "hipModuleGetFunction"), ("cuLaunchKernel", "hipModuleLaunchKernel")):
        setattr(fake, hip, getattr(fake, cu))
    fake.hipGetErrorName = lambda code: b"hipErrorInvalidValue"
    d = _driver(monkeypatch, fake, HIP_API)
    k = d.load(b"hsaco", "k", num_warps=4, shared=80 * 1024, warp_size=64)
    assert k.threads == 256  # 4 wavefronts of 64
    assert "cuCtxGetCurrent" not in [c[0] for c in fake.calls]  # torch's HIP runtime owns the device context
    assert d.error_name(1) == "hipErrorInvalidValue"


def test_missing_library_is_a_driver_error():
    with pytest.raises(DriverError, match="cannot load the GPU driver library"):
        drv._open(("libtrilite-no-such-driver.so",))
