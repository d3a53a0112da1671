"""The ``hip`` backend: the cuda backend's executor over the HIP runtime's API (libamdhip64.so).

hipModuleLoadData / hipModuleGetFunction / hipModuleLaunchKernel, and HIP's memory, stream, event and graph
functions (runtime/device.py, HIP_NAMES), take the same arguments as their CUDA driver counterparts, so
everything but the library, the target name and the shared-memory opt-in (CUDA only) is shared.

Not tested: this project has no AMD GPU to run it on. It is written against the HIP API reference and
Triton 3.6's AMD launcher (same parameter array, global-scratch pointer included); treat it as untried
until it has run an artifact compiled for an AMD target (``--target hip:gfx942``) on such a GPU.
"""

from __future__ import annotations

from runtime.backends.cuda import CudaBackend
from runtime.driver import HIP_API, _Api


class HipBackend(CudaBackend):
    """The compiled graph on an AMD GPU; untested, see the module docstring."""

    name = "hip"
    api: _Api = HIP_API

    def device_target(self) -> str:
        from runtime.backends import gpu_target  # the gfx name comes from the one place that asks HIP for it

        target = gpu_target()
        if target is None or not target.startswith("hip:"):
            raise RuntimeError(f"the hip backend found no AMD GPU (found {target})")
        return target
