"""The ``hip`` backend: the cuda backend's executor over the HIP runtime's module API (libamdhip64.so).

hipModuleLoadData / hipModuleGetFunction / hipModuleLaunchKernel take the same arguments as their CUDA
driver counterparts, and torch's ROCm build exposes HIP streams and graphs under ``torch.cuda``, so
everything but the library, the target name and the shared-memory opt-in (CUDA only) is shared.

Not tested: this project has no AMD GPU to run it on. It is written against the HIP API reference and
Triton 3.6's AMD launcher (same parameter array, global-scratch pointer included); treat it as untried
until it has run an artifact compiled for an AMD target (``--target hip:gfx942``) on such a GPU.
"""

from __future__ import annotations

import torch

from runtime.backends.cuda import CudaBackend
from runtime.driver import HIP_API, _Api


class HipBackend(CudaBackend):
    """The compiled graph on an AMD GPU (ROCm build of torch); untested, see the module docstring."""

    name = "hip"
    api: _Api = HIP_API

    def device_target(self) -> str:
        return "hip:" + torch.cuda.get_device_properties(self.device).gcnArchName.split(":")[0]
