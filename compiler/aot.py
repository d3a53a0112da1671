"""Ahead-of-time compilation of one Launch for one target, on any machine (no GPU needed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.spec import USE_PDL, Launch, with_pdl

# The architectures Triton 3.6 compiles for (its ptxas and LLVM AMDGPU back end): a name outside these tables
# would fail deep inside triton.compile with a PTXAS or LLVM traceback, so it is refused before any work.
CUDA_ARCHS = ("75", "80", "86", "87", "89", "90", "100", "103", "120", "121")
HIP_ARCHS = ("gfx90a", "gfx942", "gfx950", "gfx1100", "gfx1101", "gfx1200", "gfx1201")
# Shared memory one block may opt in to (bytes), per architecture: a config tuned on one GPU that asks for more than a
# cross-compiled target has cannot run there (compiler/build.py then builds that target with the op's default).
_CUDA_SHARED = {"75": 65536, "80": 166912, "86": 101376, "87": 166912, "89": 101376, "90": 232448, "100": 232448,
                "103": 232448, "120": 101376, "121": 101376}
_HIP_SHARED = {"gfx950": 163840}  # the others: 64 KB of LDS
TARGET_HELP = ("targets look like cuda:80, cuda:90 or hip:gfx942 (known: "
               + ", ".join([*(f"cuda:{a}" for a in CUDA_ARCHS), *(f"hip:{a}" for a in HIP_ARCHS)]) + ")")


@dataclass(frozen=True)
class Target:
    backend: str  # "cuda" | "hip"
    arch: str  # "80", "90", "gfx942"

    @staticmethod
    def parse(text: str) -> Target:
        backend, _, arch = text.partition(":")
        if backend == "cuda" and arch in CUDA_ARCHS:
            return Target("cuda", arch)
        if backend == "hip" and arch in HIP_ARCHS:
            return Target("hip", arch)
        raise ValueError(f"unknown target {text!r}: {TARGET_HELP}")

    def __str__(self) -> str:
        return f"{self.backend}:{self.arch}"

    @property
    def gpu_target(self) -> GPUTarget:
        if self.backend == "cuda":
            return GPUTarget("cuda", int(self.arch), 32)
        return GPUTarget("hip", self.arch, 64)

    @property
    def binary_ext(self) -> str:
        return "cubin" if self.backend == "cuda" else "hsaco"

    @property
    def max_shared(self) -> int:
        """Bytes of shared memory (LDS) one block may use."""
        return _CUDA_SHARED[self.arch] if self.backend == "cuda" else _HIP_SHARED.get(self.arch, 65536)

    @property
    def has_pdl(self) -> bool:
        """Programmatic dependent launch (griddepcontrol) exists from sm_90 on; not on sm_80 or AMD."""
        return self.backend == "cuda" and int(self.arch) >= 90


def for_target(launch: Launch, target: Target) -> Launch:
    """The launch as built for ``target``: kernels with a USE_PDL constexpr get it on where the target has PDL."""
    constexprs = dict(launch.constexprs)
    if USE_PDL in constexprs and target.has_pdl:
        return dataclasses.replace(launch, constexprs=tuple(sorted(with_pdl(constexprs).items())))
    return launch


def source_hash(launch: Launch) -> str:
    return launch.kernel.cache_key


def cache_key(launch: Launch, target: Target) -> str:
    """Content address of a binary: kernel source, signature, constexprs, hints, options, target, Triton."""
    blob = json.dumps(
        [source_hash(launch), launch.signature, launch.constexprs, launch.divisibility(),
         launch.num_warps, launch.num_stages, str(target), triton.__version__],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def compile_kernel(launch: Launch, target: Target):
    """Triton's compiled kernel for ``launch`` on ``target`` (every stage's code in ``.asm``: ttir ... ptx, cubin)."""
    jit = launch.kernel
    if not isinstance(jit, triton.runtime.jit.JITFunction):  # interpreted under TRITON_INTERPRET=1
        jit = triton.runtime.jit.JITFunction(jit.fn)
    sig = dict(launch.signature)
    constexprs = {name: val for name, val in launch.constexprs}
    attrs = {(i,): [["tt.divisibility", 16]] for i in launch.divisibility()}
    src = ASTSource(fn=jit, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    return triton.compile(src, target=target.gpu_target, options=options)


def compile_launch(launch: Launch, target: Target) -> tuple[bytes, dict]:
    """Compile to a cubin/hsaco. Returns (binary, metadata the driver needs to launch it)."""
    compiled = compile_kernel(launch, target)
    md = compiled.metadata
    meta = {
        "name": md.name,
        "num_warps": md.num_warps,
        "num_ctas": md.num_ctas,
        "shared": md.shared,
        "global_scratch_size": getattr(md, "global_scratch_size", 0) or 0,
        "global_scratch_align": getattr(md, "global_scratch_align", 1) or 1,
        "profile_scratch_size": getattr(md, "profile_scratch_size", 0) or 0,
        "profile_scratch_align": getattr(md, "profile_scratch_align", 1) or 1,
        "warp_size": md.warp_size,
    }
    return compiled.asm[target.binary_ext], meta
