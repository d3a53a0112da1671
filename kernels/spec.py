"""What the compiler and the runtime need to know about a kernel, independent of any GPU.

An op file builds, for one node (static sizes in ``meta``, tensor dtypes in ``dtypes``) and one
``Config``, a list of ``Launch`` records. A Launch says everything needed to compile the kernel
ahead of time (signature, constexprs, divisibility hints, warps, stages) and to launch it later
(what each runtime parameter is bound to, and the grid as a function of the step's symbols).
The same record drives three consumers: ``run()`` below (interpreter on the CPU, Triton JIT on a
GPU, used by tests and the ``interpret`` backend), ``compiler.aot`` (binaries per target) and the
runtime's ``cuda`` backend (which reads the serialised form from the artifact's index.json).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from artifact_format.kernel_index import eval_grid

# Step symbols a grid or a scalar argument may depend on; they change from step to step.
#   T: tokens in the step (rows of every activation), S: sequences in the step,
#   R: rows of logits wanted (S when generating; every token of a chunk for full-prompt logits).
SYMBOLS = ("T", "S", "R")

# The scratch role whose buffer must be zero before a launch and is left zero after it (split-K semaphores).
# The runtime gives it a zeroed buffer of its own that no other scratch overlaps (docs/artifact.md).
SEMAPHORES = "semaphores"
# The constexpr of kernels that support programmatic dependent launch (sm_90): plans set it False; the compiler
# turns it on for targets that have it and marks those binaries, which the runtime then launches with PDL.
USE_PDL = "USE_PDL"
# Where PDL-built kernels let their dependents be scheduled: 1 right after their wait, 2 once their weights are
# read (kernels/pdl.py). A build setting (TRILITE_PDL_TRIGGER), part of every binary's cache key.
PDL_TRIGGER = int(os.environ.get("TRILITE_PDL_TRIGGER", "2"))


def with_pdl(constexprs: dict) -> dict:
    """A launch's constexprs as built for a GPU with programmatic dependent launch (sm_90): USE_PDL on with the
    build's trigger. Kernels without USE_PDL: unchanged."""
    return {**constexprs, USE_PDL: PDL_TRIGGER} if USE_PDL in constexprs else constexprs


TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.int8: "i8",
}
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "i32": torch.int32,
               "i64": torch.int64, "u8": torch.uint8, "i8": torch.int8}


def dtype_name(t: torch.Tensor) -> str:
    return TORCH_TO_TRITON[t.dtype]


@dataclass(frozen=True)
class Config:
    """One point of an autotune space: constexpr values plus launch options."""

    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def make(num_warps: int = 4, num_stages: int = 2, **constexprs: Any) -> Config:
        return Config(tuple(sorted(constexprs.items())), num_warps, num_stages)

    def __getitem__(self, key: str) -> Any:
        return dict(self.constexprs)[key]

    def to_json(self) -> dict:
        return {"constexprs": dict(self.constexprs), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @staticmethod
    def from_json(d: dict) -> Config:
        return Config.make(d["num_warps"], d["num_stages"], **d["constexprs"])


# A grid dimension is a sum of terms; a term (sym, div, mul) is ceil(sym / div) * mul, and a term
# with sym None is the constant mul. Evaluating it needs nothing but integers, so the runtime's
# driver backend can do it without importing this package.
GridTerm = tuple[str | None, int, int]
GridDim = tuple[GridTerm, ...]


def grid_dim(*terms: GridTerm | int) -> GridDim:
    return tuple((None, 1, t) if isinstance(t, int) else t for t in terms)


# What a runtime parameter is bound to:
#   ("tensor", role)  pointer to the node's tensor with that role (input, output or scratch)
#   ("sym", name)     the step's value of a symbol (i32)
#   ("int", value)    a static integer (i32 or i64, per the signature)
#   ("float", value)  a static float (fp32)
Arg = tuple[str, Any]


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a node, fully resolved for a config."""

    kernel: Any  # triton JITFunction
    signature: tuple[tuple[str, str], ...]  # every parameter in order: (name, "*fp16" | "i32" | ... | "constexpr")
    constexprs: tuple[tuple[str, Any], ...]
    args: tuple[tuple[str, Arg], ...]  # every non-constexpr parameter, in order
    grid: tuple[GridDim, ...]
    num_warps: int = 4
    num_stages: int = 2

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def divisibility(self, static: dict[str, Any] | None = None) -> tuple[int, ...]:
        """Indices of parameters the compiler may assume divisible by 16.

        Pointers always are: every tensor starts 16-byte aligned (weights are separate allocations,
        activations sit at 16-byte-aligned arena offsets). Static integers are when their value is.
        """
        out = []
        args = dict(self.args)
        for i, (name, ty) in enumerate(self.signature):
            if ty.startswith("*"):
                out.append(i)
            elif ty in ("i32", "i64") and args.get(name, ("", None))[0] == "int" and args[name][1] % 16 == 0:
                out.append(i)
        return tuple(out)


@dataclass(frozen=True)
class Plan:
    """Every launch of a node for one config, in order, plus scratch buffers they share.

    scratch: role -> (numel for the largest step the artifact allows, dtype name).
    """

    launches: tuple[Launch, ...]
    scratch: tuple[tuple[str, tuple[int, str]], ...] = ()


@dataclass(frozen=True)
class KernelSpec:
    """How to build an op: candidate configs, a heuristic default, and the plan for a config.

    meta holds the node's static sizes and attributes (ints, floats, bools), plus ``max_T`` and
    ``max_S``, the most tokens and sequences one step may carry. dtypes maps each tensor role to a
    dtype name ("fp32", "fp16", "bf16", "i32", ...).
    """

    name: str
    configs: Callable[[dict], list[Config]]
    default: Callable[[dict], Config]
    plan: Callable[[dict, dict, Config], Plan]
    # Upper bounds on T for which a config is chosen separately, when the best tile depends on T
    # (linear: GEMV for few tokens, GEMM for many). meta["T_bucket"] tells configs()/default() which one.
    tune_buckets: tuple[int, ...] = field(default=())


def signature(kernel: Any, types: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Signature for every parameter of ``kernel`` in order; names missing from ``types`` are constexpr."""
    return tuple((name, types.get(name, "constexpr")) for name in kernel.arg_names)


def ptr(dtype: str) -> str:
    return "*" + dtype


def make_launch(kernel: Any, types: dict[str, str], constexprs: dict[str, Any], args: dict[str, Arg],
                grid: Sequence[GridDim], config: Config) -> Launch:
    sig = signature(kernel, types)
    missing = [n for n, t in sig if t != "constexpr" and n not in args]
    missing += [n for n, t in sig if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"{kernel.fn.__name__}: no binding for parameter(s) {missing}")
    ordered = tuple((n, args[n]) for n, t in sig if t != "constexpr")
    return Launch(kernel, sig, tuple(sorted(constexprs.items())), ordered, tuple(grid),
                  config.num_warps, config.num_stages)


def run(plan: Plan, tensors: dict[str, torch.Tensor], env: dict[str, int], interpret: bool | None = None,
        pdl: bool = False) -> None:
    """Launch every kernel of ``plan`` on torch tensors: the Triton interpreter on CPU tensors, JIT on GPU ones.

    Scratch roles missing from ``tensors`` are allocated here. ``pdl`` (sm_90 JIT only): kernels with a USE_PDL
    constexpr get it on and are launched with programmatic dependent launch, as the cuda backend does.
    """
    some = next(iter(tensors.values()))
    if interpret is None:
        interpret = some.device.type == "cpu"
    tensors = dict(tensors)
    tensors.update(alloc_scratch(plan, some.device, skip=tuple(tensors)))
    for launch in plan.launches:
        # By name: a parameter may follow the constexprs (one added later, with a default for older indexes), and
        # a variant may bind a runtime parameter to a constant (kernels.matmul_configs.token_count).
        kwargs = dict(launch.constexprs)
        for name, (kind, val) in launch.args:
            kwargs[name] = tensors[val] if kind == "tensor" else int(env[val]) if kind == "sym" else val
        grid = eval_grid(launch.grid, env)
        if math.prod(grid) == 0:
            continue
        if interpret:
            with interpreting():
                interpreted(launch.kernel.fn)[grid](**kwargs)
        else:
            options = {}
            if pdl and USE_PDL in kwargs:
                kwargs, options["launch_pdl"] = with_pdl(kwargs), True
            launch.kernel[grid](**kwargs, num_warps=launch.num_warps, num_stages=launch.num_stages, **options)


def alloc_scratch(plan: Plan, device: Any, skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Fresh scratch buffers for a plan's roles not in ``skip``: uninitialised, but zeroed for the semaphores."""
    return {role: (torch.zeros if role == SEMAPHORES else torch.empty)(numel, dtype=DTYPE_NAMES[dt], device=device)
            for role, (numel, dt) in plan.scratch if role not in skip}


_INTERPRETED: dict = {}


def interpreted(fn: Callable) -> Any:
    """The interpreter's twin of a @triton.jit function (made once per function)."""
    from triton.runtime.interpreter import InterpretedFunction

    if fn not in _INTERPRETED:
        _INTERPRETED[fn] = InterpretedFunction(fn)
    return _INTERPRETED[fn]


@contextlib.contextmanager
def interpreting():
    """Let a kernel imported without TRITON_INTERPRET run in the interpreter, nested jit calls included.

    Triton's own jit helpers (tl.sum, tl.max, tl.cdiv, ...) and ours are JITFunctions that refuse to be
    called outside a compiled kernel; while interpreting, a call to one runs its interpreted twin, which
    is what Triton does itself under TRITON_INTERPRET=1. The process stays able to compile for real.
    """
    from triton.runtime.interpreter import _patch_lang
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        # Patch the language as seen from the helper's own module (tl.zeros & co. there), and restore it
        # afterwards: InterpretedFunction.__call__ never restores, which breaks later compilation.
        scope = _patch_lang(self.fn)
        try:
            return interpreted(self.fn).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    original = JITFunction.__call__
    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original
