"""The interface every backend implements, and KV-cache sizing shared by them.

A backend owns the device-side state of an artifact (weights, KV-cache blocks, activations) and runs
one step at a time: ``forward`` (StepInput -> logits [R, V] fp32, a numpy array on the host, whatever the
backend) and ``sample`` (the sampling op, host arrays in and out), or both at once with ``submit``, which may
return before the step has run: its sampled ids come back through a ``PendingIds``, and the next step can take
them as the input ids of its leading one-token rows on the device (``feed``). Scheduling, block tables and stop
conditions live above it, in the engine."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from artifact_format.graph import DTYPE_BYTES
from runtime.artifact import Artifact
from runtime.staging import PendingIds
from runtime.step import StepInput


class Backend(ABC):
    name: str = ""
    device: Any  # what the backend runs on ("cpu", a torch device, or the GPU's ordinal for cuda)
    num_blocks: int  # KV-cache blocks this backend allocated

    def __init__(self, artifact: Artifact, kv_cache_gb: float | None = None, max_blocks_total: int | None = None):
        self.artifact = artifact
        self._last_sampled: np.ndarray | None = None  # the last submit's ids, what a feed reads (default submit)

    def close(self) -> None:
        """Give back device memory before the backend is dropped (host-memory backends hold none of their own)."""
        return None

    @abstractmethod
    def forward(self, step: StepInput) -> np.ndarray:
        """Run the graph on one step; logits [R, V] fp32 as a host (numpy) array of its own (rows
        ``step.last_idx``), the same type and values on every backend."""

    @abstractmethod
    def sample(self, logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
               min_p: np.ndarray, seeds: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The sampling op (docs/ops.md): logits [R, V] fp32 and per-row params [R] -> token ids [R] int32, all
        host arrays."""

    def submit(self, step: StepInput, sampling: dict[str, np.ndarray], feed: np.ndarray | None = None) -> PendingIds:
        """Enqueue ``forward`` then ``sample`` (``sampling``: its per-row host arrays); the ids [R] to come.

        feed ([n] int32 over the step's first n rows, each of one token: every row of a decode step, the decode
        rows a mixed prefill step starts with): where feed[i] >= 0, row i's input id is row feed[i] of the previous
        submit's sampled ids, taken on the device (the host's id there is only a placeholder). This default
        runs synchronously; backends with a stream (cuda) return as soon as the work is enqueued.
        """
        if feed is not None:
            step = fed_step(step, self._last_sampled, feed)
        # A negative id is a placeholder nobody fed, an engine bug: fail rather than embed some other token.
        if (step.ids < 0).any():
            raise RuntimeError(f"step ids {step.ids.tolist()} hold placeholders (feed {feed})")
        self._last_sampled = np.asarray(self.sample(self.forward(step), **sampling))
        return PendingIds(self._last_sampled)

    def capture_graphs(self) -> float:
        """Seconds spent capturing decode graphs; 0.0 where the backend has none."""
        return 0.0

    def warmup(self) -> None:
        """Run whatever makes the first real step fast; nothing by default."""
        return None

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn``'s work takes here: the host clock by default (a GPU backend times on its stream)."""
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def copy_bandwidth(self, nbytes: int = 1 << 28, repeats: int = 7) -> float:
        """Bytes per second of a large copy within this backend's memory (read + written), median of ``repeats``:
        host memory by default."""
        src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        return 2 * nbytes / statistics.median(self.timed(lambda: np.copyto(dst, src)) for _ in range(repeats))


def fed_step(step: StepInput, sampled: np.ndarray | None, feed: np.ndarray) -> StepInput:
    """``step`` with the fed rows' ids taken from ``sampled`` (on the host: what a device gather does elsewhere)."""
    take, n = feed >= 0, feed.shape[0]
    if not step.single_token_rows(n) or (take.any() and sampled is None):
        raise ValueError(f"a feed maps each of a step's leading one-token rows to a sampled row of the previous "
                         f"step: got a {step.kind} step of cu_seqlens_q {step.cu_seqlens_q.tolist()}, feed "
                         f"{feed.tolist()}")
    ids = step.ids.copy()
    if take.any():  # the first n rows are the first n tokens
        ids[:n][take] = np.asarray(sampled)[feed[take].astype(np.int64)]
    return dataclasses.replace(step, ids=ids)


def kv_bytes_per_block(artifact: Artifact) -> int:
    """Bytes of one KV block summed over the cache buffers (source caches; written names alias them)."""
    total = 0
    for spec in artifact.graph.sources("cache"):
        total += math.prod(d for d in spec.shape if d != "NB") * DTYPE_BYTES[spec.dtype]
    return total


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def num_kv_blocks(artifact: Artifact, kv_cache_gb: float | None, max_blocks_total: int | None,
                  budget_bytes: int, memory_bytes: int = 0, where: str = "this machine") -> int:
    """How many KV blocks to allocate.

    ``kv_cache_gb`` given: as many as fit in it. Otherwise enough for max_batch sequences of max_seq_len
    tokens, capped at ``budget_bytes`` (a backend's share of free memory) but never below one longest
    sequence. ``max_blocks_total`` caps the result (tests use it to make blocks run out). ``memory_bytes``
    (the device's whole memory, 0: unknown) bounds ``kv_cache_gb``: asking for more is refused up front
    rather than left to fail inside an allocation.
    """
    per_block = kv_bytes_per_block(artifact)
    limits = artifact.limits
    longest = limits.max_blocks
    if kv_cache_gb is not None:
        if not math.isfinite(kv_cache_gb) or kv_cache_gb <= 0:
            raise ValueError(f"--kv-cache-gb must be a positive number of GiB, not {kv_cache_gb}")
        if memory_bytes and kv_cache_gb * (1 << 30) > memory_bytes:
            raise ValueError(f"--kv-cache-gb {kv_cache_gb:g} is more than {where} has ({memory_bytes / 2**30:.1f} "
                             f"GiB in all): give a smaller --kv-cache-gb, or leave it out to size the cache from "
                             f"free memory")
        n = int(kv_cache_gb * (1 << 30)) // per_block
        if n < 1:
            raise ValueError(f"kv_cache_gb {kv_cache_gb} holds no KV block of {per_block} bytes: give more")
    else:
        n = max(min(limits.max_batch * longest, budget_bytes // per_block), longest)
    if max_blocks_total is not None:
        n = min(n, max_blocks_total)
    return max(n, 1)
