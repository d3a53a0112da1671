"""The ``interpret`` backend: the artifact's own kernel launches, run on the CPU by the Triton interpreter.

It executes index.json exactly as the ``cuda`` backend does (same Program: arena, views, step buffers, KV
caches, bound parameters, grids, variant choice), but each launch calls the Triton kernel named by its
binary entry (``module``, ``kernel``, ``constexprs``) through the interpreter instead of loading the binary.
That is how CI checks the compiled graph and its kernels without a GPU. Any target's index works: the
launches differ between targets only in configs, which the interpreter runs all the same. Decode steps start
with ``Program.feed_ids`` as the cuda backend's graphs do, so a fed ``submit`` runs the very same gather.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
from triton.runtime.jit import KernelInterface

from kernels.spec import interpreted, interpreting
from runtime.artifact import Artifact
from runtime.backends.base import Backend, num_kv_blocks, physical_memory
from runtime.backends.torch_memory import TorchMemory
from runtime.bound import BoundLaunch
from runtime.errors import ArtifactError
from runtime.program import Program
from runtime.staging import PendingIds
from runtime.step import StepInput

# The kernel pack's op modules: the only modules an artifact can make this backend import. index.json's
# ``module`` is looked up here, never passed to import_module, so a crafted index cannot run other code.
KERNEL_MODULES = {m: m for m in (  # index name -> the string imported, this table's own
    "kernels.add_rms_norm", "kernels.attention_decode", "kernels.attention_prefill", "kernels.embedding",
    "kernels.gelu_tanh_mul", "kernels.kv_cache_write", "kernels.linear", "kernels.logits", "kernels.moe",
    "kernels.moe_grouped", "kernels.moe_router", "kernels.rms_norm", "kernels.rms_norm_gated",
    "kernels.rms_norm_linear", "kernels.rope", "kernels.sampling", "kernels.silu_mul")}
_KERNELS: dict[tuple[str, str], Any] = {}


def kernel_of(module: str, name: str) -> Any:
    """The @triton.jit function ``module.name`` of the kernel pack that a binary was compiled from."""
    if (module, name) not in _KERNELS:
        if not isinstance(module, str) or module not in KERNEL_MODULES:
            raise ArtifactError(f"index.json names module {module!r}, which is not in the kernel pack: the artifact "
                                f"is damaged or not trilite's; rebuild it with `compiler compile`")
        fn = getattr(importlib.import_module(KERNEL_MODULES[module]), name, None) if isinstance(name, str) else None
        if not isinstance(fn, KernelInterface):
            raise ArtifactError(f"index.json names kernel {name!r}, which {module} does not define: rebuild the "
                                f"artifact with this version's compiler")
        _KERNELS[(module, name)] = fn
    return _KERNELS[(module, name)]


def run_interpreted(launch: BoundLaunch, env: dict[str, int]) -> None:
    """Run one bound launch in the Triton interpreter on its (CPU) tensors for the step symbols ``env``."""
    grid = launch.grid_for(env)
    if math.prod(grid) == 0:
        return
    kernel = kernel_of(launch.binary.module, launch.binary.kernel)
    constexprs = dict(launch.binary.constexprs)
    if constexprs.get("USE_PDL"):  # an sm_90 index: the interpreter runs one program at a time, nothing to overlap
        constexprs["USE_PDL"] = False
    with interpreting():
        # By name: a parameter may follow the constexprs (one added later, with a default for older indexes).
        interpreted(kernel.fn)[grid](**dict(zip((p.name for p in launch.params), launch.args(env))), **constexprs)


class InterpretBackend(Backend):
    """The compiled graph on the CPU, every kernel through the Triton interpreter (slow; for tests and CI)."""

    name = "interpret"

    def __init__(self, artifact: Artifact, kv_cache_gb: float | None = None, max_blocks_total: int | None = None,
                 target: str | None = None):
        super().__init__(artifact, kv_cache_gb, max_blocks_total)
        self.device = "cpu"
        self.target = target or artifact.targets[0]
        index = artifact.kernel_index(self.target)
        for b in index.binaries.values():  # every kernel resolved (and refused) before any work
            kernel_of(b.module, b.kernel)
        weights = artifact.weights()
        self.program = Program(artifact, index, TorchMemory(), weights)
        self.num_blocks = num_kv_blocks(artifact, kv_cache_gb, max_blocks_total, physical_memory() // 8,
                                        physical_memory(), "this machine's RAM")
        self.program.allocate_kv(self.num_blocks)

    def _forward(self, step: StepInput, feed: np.ndarray | None = None) -> int:
        """Run the step, its logits left in the arena; returns R (feed: see ``submit``)."""
        env = self.program.load_step(step, feed=feed)
        if step.kind == "decode" or feed is not None:  # a prefill step's fed rows are its leading ones
            self.program.feed_ids(env["T"] if feed is None else len(feed))
        for launch in self.program.launches(step.kind, env):
            run_interpreted(launch, env)
        return env["R"]

    def forward(self, step: StepInput) -> np.ndarray:
        """Logits [R, V] fp32 on the host."""
        return self.program.logits_host(self._forward(step))

    def _sample(self, R: int, logits: np.ndarray | None, sampling: dict[str, np.ndarray]) -> np.ndarray:
        env = self.program.load_sampling(R, logits, **sampling)
        for launch in self.program.extra_launches("sampling", env):
            run_interpreted(launch, env)
        return self.program.memory.read(self.program.sampled_ids(R))

    def sample(self, logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
               min_p: np.ndarray, seeds: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Token ids [R] int32 from the artifact's sampling kernel."""
        return self._sample(len(logits), logits, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                      min_p=min_p, seeds=seeds, offsets=offsets))

    def submit(self, step: StepInput, sampling: dict[str, np.ndarray], feed: np.ndarray | None = None) -> PendingIds:
        """Forward and sample now (the interpreter has no stream), the feed applied by the program's gather."""
        return PendingIds(self._sample(self._forward(step, feed), None, sampling))
