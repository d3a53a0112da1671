"""The ``cuda`` backend: the artifact's binaries loaded through the driver API, decode steps in CUDA graphs.

Start-up: check the artifact has binaries for this GPU, load each binary once, copy the weights, build the
Program (arena, step buffers, scratch), size the KV cache from free memory, then build one parameter array
per bound launch. A step is then ``Program.load_step`` (one host-to-device copy) plus one ``cuLaunchKernel``
per launch on torch's current stream, or, for decode, one graph replay: decode steps are captured per batch
bucket, largest first into one memory pool, and a step of S sequences replays the smallest bucket ≥ S with
the rows beyond S padded (the kernels mask padding rows). Each decode graph starts with ``Program.feed_ids``,
so ``submit`` can give a decode step the previous step's sampled ids as input on the GPU; it enqueues the
step, the sampling kernel and an asynchronous copy of the ids into pinned memory, and returns without a sync.
Torch provides memory, streams and graph capture; neither Triton nor the kernel pack is imported here.
"""

from __future__ import annotations

import bisect
import os
import time

import torch
from torch import Tensor

from runtime.artifact import Artifact
from runtime.backends.base import Backend, num_kv_blocks
from runtime.bound import BoundLaunch
from runtime.driver import CUDA_API, Driver, Kernel, ParamArray, _Api
from runtime.errors import ArtifactError
from runtime.program import Program
from runtime.staging import PendingIds, Readback
from runtime.step import StepInput

KV_FRACTION = 0.9  # of the memory free after weights, arena and scratch


class _Site:
    """One bound launch made ready for the driver: its kernel, parameter array and per-step scalar slots."""

    __slots__ = ("kernel", "params", "syms", "grid", "launch")

    def __init__(self, launch: BoundLaunch, kernel: Kernel):
        self.launch = launch
        self.kernel = kernel
        values = [p.value.data_ptr() if p.kind == "tensor" else 0 if p.kind == "sym" else p.value
                  for p in launch.params]
        scratch = [t.data_ptr() if t is not None else 0 for t in (launch.global_scratch, launch.profile_scratch)]
        self.params = ParamArray([p.type for p in launch.params], values, *scratch)
        self.syms = [(i, p.value) for i, p in enumerate(launch.params) if p.kind == "sym"]
        self.grid = launch.grid_for


class CudaBackend(Backend):
    """The compiled graph on an NVIDIA GPU through libcuda; ``HipBackend`` reuses it over libamdhip64."""

    name = "cuda"
    api: _Api = CUDA_API

    def __init__(self, artifact: Artifact, kv_cache_gb: float | None = None, max_blocks_total: int | None = None,
                 cuda_graphs: bool = True, pdl: bool | None = None):
        """cuda_graphs: capture the decode graphs now (``capture_seconds`` says how long it took); without them
        every step launches eagerly until ``capture_graphs()`` is called. pdl: launch the binaries built for
        programmatic dependent launch with it (False launches them plainly, which is equally correct: their
        gdc_wait then returns at once). None: on unless TRILITE_PDL=0 (on the H200 it makes TinyLlama-1.1B's
        batch-1 decode 5% faster and Llama-3-8B's 1-2%, benchmarks/results/decode.md)."""
        super().__init__(artifact, kv_cache_gb, max_blocks_total)
        if not torch.cuda.is_available():
            raise ArtifactError(f"backend {self.name} needs a GPU and torch sees none: use --backend torch")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.target = self.device_target()
        if self.target not in artifact.targets:
            raise ArtifactError(f"artifact has kernels for {', '.join(artifact.targets)}, this GPU is {self.target}: "
                                f"recompile with --target {self.target}")
        index = artifact.kernel_index(self.target)
        weights = {k: v.to(self.device) for k, v in artifact.weights().items()}
        self.program = Program(artifact, index, self.device, weights)
        self.driver = Driver(self.api, self.device.index)
        if pdl is None:  # on by default where the driver can launch it (the binaries are correct either way)
            pdl = os.environ.get("TRILITE_PDL", "1") != "0" and self.driver.supports_pdl
        for b in index.binaries.values():
            if b.num_ctas != 1:
                raise ArtifactError(f"kernel {b.name} uses thread-block clusters (num_ctas={b.num_ctas}), "
                                    f"which this runtime does not launch: rebuild the artifact with num_ctas=1")
        kernels = {key: self.driver.load(artifact.binary(self.target, b.file), b.name, b.num_warps, b.shared,
                                         b.warp_size, pdl and b.pdl)
                   for key, b in index.binaries.items()}
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        self.num_blocks = num_kv_blocks(artifact, kv_cache_gb, max_blocks_total, int(free * KV_FRACTION), total,
                                        "this GPU")
        self.program.allocate_kv(self.num_blocks)
        self._sites = [_Site(b, kernels[b.key]) for b in self.program.all_launches()]
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._buckets: list[int] = []
        self._readback = Readback(self.program.max_batch)
        self.capture_seconds = self.capture_graphs() if cuda_graphs else 0.0

    def device_target(self) -> str:
        major, minor = torch.cuda.get_device_capability(self.device)
        return f"cuda:{major}{minor}"

    def _run(self, launches: list[BoundLaunch], env: dict[str, int]) -> None:
        """Launch in order on the current stream (inside a graph capture, the capturing stream)."""
        stream = torch.cuda.current_stream(self.device).cuda_stream
        launch = self.driver.launch
        for b in launches:
            site = self._sites[b.uid]
            for i, sym in site.syms:
                site.params.set(i, env[sym])
            grid = site.grid(env)
            if grid[0] and grid[1] and grid[2]:
                launch(site.kernel, grid, site.params, stream)

    def forward(self, step: StepInput, feed: Tensor | None = None) -> Tensor:
        """Logits [R, V] fp32: a view of the program's arena, valid until the next step (feed: see ``submit``)."""
        if step.kind == "decode" and self._buckets and step.S <= self._buckets[-1]:
            bucket = self._buckets[bisect.bisect_left(self._buckets, step.S)]
            self.program.load_step(step, pad_to=bucket, feed=feed)
            self._graphs[bucket].replay()
            return self.program.logits(step.R)
        env = self.program.load_step(step, feed=feed)
        if feed is not None:  # its leading one-token rows only: T may exceed the pool's max_batch ids
            self.program.feed_ids(len(feed))
        self._run(self.program.launches(step.kind, env), env)
        return self.program.logits(env["R"])

    def submit(self, step: StepInput, sampling: dict[str, Tensor], feed: Tensor | None = None) -> PendingIds:
        """Enqueue the step, its sampling and the copy of the ids to pinned memory; no host sync."""
        env = self.program.load_sampling(self.forward(step, feed), **sampling)
        self._run(self.program.extra_launches("sampling", env), env)
        return self._readback.copy(self.program.extra_buffers["sampling"]["out"][:env["R"]])

    def sample(self, logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
               seeds: Tensor, offsets: Tensor) -> Tensor:
        """Token ids [R] int32 from the artifact's sampling kernel, on the GPU."""
        env = self.program.load_sampling(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                         seeds=seeds, offsets=offsets)
        self._run(self.program.extra_launches("sampling", env), env)
        return self.program.extra_buffers["sampling"]["out"][:env["R"]].clone()

    def capture_graphs(self) -> float:
        """Capture one decode graph per bucket (largest first, one shared pool); returns the seconds it took.

        Each bucket first runs once eagerly on padding rows, so a launch error surfaces outside capture.
        Padding rows write nothing to the KV cache (slot -1), so capture leaves the cache as it was.
        """
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        self._graphs.clear()
        self._buckets = []
        pool = None
        for bucket in sorted(self.program.decode_buckets, reverse=True):
            env = self.program.load_padding(bucket)
            launches = self.program.launches("decode", env)
            self.program.feed_ids(bucket)
            self._run(launches, env)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.program.feed_ids(bucket)  # the input ids first: the host's, or the last step's samples
                self._run(launches, env)
            pool = graph.pool() if pool is None else pool
            self._graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        self._buckets = sorted(self._graphs)
        return time.perf_counter() - t0

    def warmup(self) -> None:
        """One eager decode on padding rows: first-launch costs (module set-up, lazy clocks) paid before serving."""
        env = self.program.load_padding(1)
        self._run(self.program.launches("decode", env), env)
        torch.cuda.synchronize(self.device)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.program.weights.values())

    @property
    def kv_bytes_per_token(self) -> int:
        return self.program.kv_block_bytes // self.program.block_size

    def close(self) -> None:
        """Drop the graphs and unload the modules (the backend is unusable afterwards)."""
        self._graphs.clear()
        self._buckets = []
        torch.cuda.synchronize(self.device)
        self.driver.close()

