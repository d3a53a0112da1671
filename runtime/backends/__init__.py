"""Backends by name: ``make_backend("torch" | "interpret" | "cuda" | "hip" | "auto", artifact, **kw)``.

Modules are imported only when their backend is asked for, so the torch path never loads the driver
and the GPU path (cuda) imports neither torch nor Triton. interpret and torch run the kernel pack (kernels/),
which needs torch and Triton: without the compile extra, asking for them is a one-line MissingExtra.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import warnings

from runtime.artifact import Artifact
from runtime.backends.base import Backend
from runtime.errors import ArtifactError, needs_compile_extra

MODULES = {
    "torch": "runtime.backends.torch_ref",
    "interpret": "runtime.backends.interpret",
    "cuda": "runtime.backends.cuda",
    "hip": "runtime.backends.hip",
}
NAMES = ("auto", *MODULES)


@functools.lru_cache(maxsize=1)
def gpu_target() -> str | None:
    """This machine's GPU as an artifact target ("cuda:90", "hip:gfx942"), or None without one.

    CUDA is asked through the driver library (runtime.device.cuda_target: no torch). An AMD GPU's gfx name comes
    from torch's ROCm build, imported only where the HIP runtime library is present."""
    from runtime.device import cuda_target

    target = cuda_target()
    if target is not None:
        return target
    try:
        ctypes.CDLL("libamdhip64.so")
    except OSError:
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not torch.version.hip:
        return None
    return "hip:" + torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]


def resolve(name: str, artifact: Artifact) -> str:
    """The concrete backend ``name`` stands for: auto -> cuda/hip when this GPU is a target, else torch."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)}")
    target = gpu_target()
    if name == "auto":
        if target is None:
            return "torch"
        if target in artifact.targets:
            return target.split(":")[0]
        warnings.warn(f"artifact {artifact.name} has no kernels for this GPU ({target}), running on the CPU with the "
                      f"torch backend: recompile with --target {target} to use the GPU", stacklevel=3)
        return "torch"
    if name in ("cuda", "hip"):
        if target is None or not target.startswith(name):
            # The CPU backends run the kernel pack's references and interpreter: a runtime-only install lacks them.
            extra = "" if importlib.util.find_spec("triton") else " (after pip install 'trilite[compile]')"
            raise ArtifactError(f"backend {name} needs a {name.upper()} GPU and this machine has "
                                f"{target or 'none'}: use --backend torch or interpret{extra}")
        if target not in artifact.targets:
            raise ArtifactError(f"artifact has kernels for {', '.join(artifact.targets)}, this GPU is {target}: "
                                f"recompile with --target {target}")
    return name


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass whose ``name`` is ``name``, from its module."""
    with needs_compile_extra(f"the {name} backend"):
        module = importlib.import_module(MODULES[name])
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Backend) and obj is not Backend and obj.name == name:
            return obj
    raise ImportError(f"{MODULES[name]} defines no Backend subclass named {name!r}")


def make_backend(name: str, artifact: Artifact, **kw) -> Backend:
    """Build the backend ``name`` ("auto" resolves first) for ``artifact``; kw go to its constructor."""
    return backend_class(resolve(name, artifact))(artifact, **kw)
