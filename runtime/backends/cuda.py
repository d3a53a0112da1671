"""The ``cuda`` backend: the artifact's binaries loaded through the driver API, decode steps in CUDA graphs.

No torch and no Triton: memory, copies, the stream, events and graphs are driver calls (runtime/device.py),
kernels are loaded and launched by runtime/driver.py, host arrays are numpy.

Start-up: check the artifact has binaries for this GPU, copy the weights from the memory-mapped file into one
device allocation (runtime/weights_upload.py, on a worker thread) while each binary is loaded once, build the
Program (arena, step buffers, scratch), size the KV cache from free memory, then build one parameter array per
bound launch. A step is then
``Program.load_step`` (one host-to-device copy) plus one ``cuLaunchKernel`` per launch on the device's stream, or,
for decode, one graph replay: decode steps are captured per batch bucket, largest first, and a step of S sequences
replays the smallest bucket ≥ S with the rows beyond S padded (the kernels mask padding rows).

Asynchronous decode: ``submit`` enqueues the step, the sampling kernel and an asynchronous copy of the ids into
pinned memory, and returns without a sync. A fed row (its input id is a sampled id of the step before, still on
the device) gets it by a device-to-device copy enqueued after the step's upload and before its launches (or its
graph): ``Program.feed_runs`` lists them, one copy per run of consecutive rows (one for a batch that kept its order).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import time

import numpy as np

from runtime.artifact import Artifact
from runtime.backends.base import Backend, num_kv_blocks
from runtime.bound import BoundLaunch
from runtime.device import Device, DeviceMemory, compute_capability
from runtime.driver import CUDA_API, Driver, Kernel, ParamArray, _Api
from runtime.errors import ArtifactError
from runtime.program import Program
from runtime.staging import PendingIds
from runtime.step import StepInput
from runtime.weights_upload import upload_in_background, upload_weights

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


class Readback:
    """Device int32 rows copied into pinned host memory without a sync: a ring of ``depth`` pinned buffers.

    The engine reads step N's ids while step N+1 runs, so two buffers are in use at a time; a third spares the
    wait. A buffer is reused only after its ids were taken (reused early, they are taken then, which waits).
    """

    def __init__(self, device: Device, rows: int, depth: int = 3):
        self.device = device
        self._hosts = [device.pinned(4 * rows).view(np.int32) for _ in range(depth)]
        self._events = [device.event() for _ in range(depth)]
        self._owners: list[PendingIds | None] = [None] * depth
        self._turn = 0

    def copy(self, src) -> PendingIds:
        """Enqueue the copy of ``src`` ([n] int32 DeviceArray) on the device's stream."""
        k = self._turn
        self._turn = (k + 1) % len(self._hosts)
        if self._owners[k] is not None:
            self._owners[k].tokens()
        host = self._hosts[k][:src.shape[0]]
        self.device.dtoh(host, src.ptr, src.nbytes)
        self._events[k].record()
        self._owners[k] = PendingIds(host, self._events[k])
        return self._owners[k]


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
        self.device = 0  # the first visible GPU (CUDA_VISIBLE_DEVICES picks it), as torch's default device is
        self.driver = Driver(self.api, self.device)
        self.target = self.device_target()
        if self.target not in artifact.targets:
            raise ArtifactError(f"artifact has kernels for {', '.join(artifact.targets)}, this GPU is {self.target}: "
                                f"recompile with --target {self.target}")
        if artifact.manifest.get("model", {}).get("quant") == "gguf" and os.environ.get("TRILITE_GGUF_ON_GPU") != "1":
            # On an H200 (2026-12-02) every GGUF-layout matmul, embedding and logits case of tests/gpu/test_gguf_gpu.py
            # passed (an earlier run's failures were the GPU image lacking the gguf package); its whole-artifact check
            # against HF transformers has not completed on a GPU yet: refuse until it has.
            raise ArtifactError("this artifact keeps its GGUF source's quantized tensors (--quant gguf), which are not "
                                "yet verified on the GPU: recompile with --quant none (or int8 / int4) for "
                                f"{self.name}, or run it with --backend torch")
        index = artifact.kernel_index(self.target)
        for b in index.binaries.values():
            if b.num_ctas != 1:
                raise ArtifactError(f"kernel {b.name} uses thread-block clusters (num_ctas={b.num_ctas}), "
                                    f"which this runtime does not launch: rebuild the artifact with num_ctas=1")
        self.gpu = Device(self.driver)
        # The weights are copied first, on a thread of their own (TRILITE_WEIGHTS_THREAD=0: on this one, before the
        # binaries), so reading the file and the DMA overlap loading the binaries below.
        data_start, ranges = artifact.weight_ranges()
        source = artifact.path / "weights.safetensors"
        if os.environ.get("TRILITE_WEIGHTS_THREAD", "1") != "0":
            weights_done = upload_in_background(source, data_start, ranges, self.gpu)
        else:
            uploaded = upload_weights(source, data_start, ranges, self.gpu)
            weights_done = lambda: uploaded
        if pdl is None:  # on by default where the driver can launch it (the binaries are correct either way)
            pdl = os.environ.get("TRILITE_PDL", "1") != "0" and self.driver.supports_pdl
        try:
            kernels = {key: self.driver.load(artifact.binary(self.target, b.file), b.name, b.num_warps, b.shared,
                                             b.warp_size, pdl and b.pdl)
                       for key, b in index.binaries.items()}
        except BaseException:
            with contextlib.suppress(BaseException):  # the copies end before the error leaves: nothing runs behind
                weights_done()
            raise
        weights, _ = weights_done()
        self._weight_bytes = sum(a.nbytes for a in weights.values())
        self.memory = DeviceMemory(self.gpu)
        self.program = Program(artifact, index, self.memory, weights)
        self.gpu.synchronize()
        free, total = self.gpu.mem_info()
        self.num_blocks = num_kv_blocks(artifact, kv_cache_gb, max_blocks_total, int(free * KV_FRACTION), total,
                                        "this GPU")
        self.program.allocate_kv(self.num_blocks)
        self._sites = [_Site(b, kernels[b.key]) for b in self.program.all_launches()]
        self._graphs: dict[int, object] = {}
        self._buckets: list[int] = []
        self._readback = Readback(self.gpu, self.program.max_batch)
        self.gpu.synchronize()
        self.capture_seconds = self.capture_graphs() if cuda_graphs else 0.0

    def device_target(self) -> str:
        major, minor = compute_capability(self.driver, self.device)
        return f"cuda:{major}{minor}"

    def _run(self, launches: list[BoundLaunch], env: dict[str, int]) -> None:
        """Launch in order on the device's stream (inside a graph capture, the capturing stream)."""
        stream = self.gpu.stream
        launch = self.driver.launch
        for b in launches:
            site = self._sites[b.uid]
            for i, sym in site.syms:
                site.params.set(i, env[sym])
            grid = site.grid(env)
            if grid[0] and grid[1] and grid[2]:
                launch(site.kernel, grid, site.params, stream)

    def _feed(self) -> None:
        """The fed rows' ids from the last sampled ids, on the device (after the step's upload, before its work)."""
        ids, pool = self.program.inputs["ids"], self.program.token_pool
        for row, src, count in self.program.feed_runs:
            self.gpu.dtod(ids.ptr + 4 * row, pool.ptr + 4 * src, 4 * count)

    def _forward(self, step: StepInput, feed: np.ndarray | None = None) -> int:
        """Enqueue the step; its logits stay in the arena. Returns R (feed: see ``submit``)."""
        if step.kind == "decode" and self._buckets and step.S <= self._buckets[-1]:
            bucket = self._buckets[bisect.bisect_left(self._buckets, step.S)]
            self.program.load_step(step, pad_to=bucket, feed=feed)
            self._feed()
            self._graphs[bucket].launch()
            return step.R
        env = self.program.load_step(step, feed=feed)
        self._feed()
        self._run(self.program.launches(step.kind, env), env)
        return env["R"]

    def forward(self, step: StepInput) -> np.ndarray:
        """Logits [R, V] fp32 on the host (waits for the step)."""
        return self.program.logits_host(self._forward(step))

    def _enqueue_sampling(self, R: int, logits: np.ndarray | None, sampling: dict[str, np.ndarray]) -> None:
        env = self.program.load_sampling(R, logits, **sampling)
        self._run(self.program.extra_launches("sampling", env), env)

    def submit(self, step: StepInput, sampling: dict[str, np.ndarray], feed: np.ndarray | None = None) -> PendingIds:
        """Enqueue the step, its sampling and the copy of the ids to pinned memory; no host sync."""
        R = self._forward(step, feed)
        self._enqueue_sampling(R, None, sampling)
        return self._readback.copy(self.program.sampled_ids(R))

    def sample(self, logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
               min_p: np.ndarray, seeds: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Token ids [R] int32 from the artifact's sampling kernel on the GPU, for host logits [R, V] (waits)."""
        R = len(logits)
        self._enqueue_sampling(R, logits, dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                               seeds=seeds, offsets=offsets))
        return self.memory.read(self.program.sampled_ids(R))

    def capture_graphs(self) -> float:
        """Capture one decode graph per bucket (largest first); returns the seconds it took.

        Each bucket first runs once eagerly on padding rows, so a launch error surfaces outside capture.
        Padding rows write nothing to the KV cache (slot -1), so capture leaves the cache as it was. A graph
        holds the launches only: the step's upload and fed ids are enqueued before each replay.
        """
        self.gpu.synchronize()
        t0 = time.perf_counter()
        self._drop_graphs()
        for bucket in sorted(self.program.decode_buckets, reverse=True):
            env = self.program.load_padding(bucket)
            launches = self.program.launches("decode", env)
            self._run(launches, env)
            self.gpu.synchronize()  # the eager run (and its upload) done before capture begins
            self.gpu.begin_capture()
            try:
                self._run(launches, env)
            finally:
                graph = self.gpu.end_capture()
            self._graphs[bucket] = graph
        self.gpu.synchronize()
        self._buckets = sorted(self._graphs)
        return time.perf_counter() - t0

    def _drop_graphs(self) -> None:
        for g in self._graphs.values():
            g.destroy()
        self._graphs.clear()
        self._buckets = []

    def warmup(self) -> None:
        """One eager decode on padding rows: first-launch costs (module set-up, lazy clocks) paid before serving."""
        env = self.program.load_padding(1)
        self._run(self.program.launches("decode", env), env)
        self.gpu.synchronize()

    def timed(self, fn) -> float:
        """Seconds ``fn``'s work takes on the GPU, from events on the stream around it."""
        start, end = self.gpu.event(timing=True), self.gpu.event(timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return end.seconds_since(start)

    def copy_bandwidth(self, nbytes: int = 1 << 30, repeats: int = 7) -> float:
        """Bytes per second of a device-to-device copy (read + written), median of ``repeats``."""
        src, dst = self.gpu.alloc(nbytes), self.gpu.alloc(nbytes)
        try:
            self.gpu.memset(src, 7, nbytes)
            self.gpu.dtod(dst, src, nbytes)
            times = sorted(self.timed(lambda: self.gpu.dtod(dst, src, nbytes)) for _ in range(repeats))
        finally:
            self.gpu.synchronize()
            self.gpu.free(src)
            self.gpu.free(dst)
        return 2 * nbytes / times[len(times) // 2]

    @property
    def weight_bytes(self) -> int:
        return self._weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.program.kv_block_bytes // self.program.block_size

    def close(self) -> None:
        """Drop the graphs, free the memory and unload the modules (the backend is unusable afterwards); a second
        call does nothing."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._drop_graphs()
        self.gpu.close()
        self.driver.close()
