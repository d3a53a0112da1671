"""An artifact made executable on one device: every buffer allocated once, every kernel launch bound to it.

The memory plan is static, so a ``Program`` allocates everything up front, from a ``runtime.memory.Memory``
(torch CPU tensors for the interpreter, raw device memory for cuda): the activation arena (one byte buffer; each
activation is a typed view at its planned offset, sized for the largest step), the step inputs
(one device buffer, each input at a 16-byte-aligned offset, mirrored in pinned host memory so a step is one
host-to-device copy), the paged KV caches, one scratch buffer shared by all nodes (they run one after the
other) and the sampling buffers. The sampled ids land in the first half of a token pool whose second half a
decode step fills from its host ids, so one gather (``feed_ids``) gives the step its input ids from either:
that is how step N's samples become step N+1's input without a trip through the host (the cuda backend does
the same with device-to-device copies of the runs ``feed_runs`` lists). Then it resolves
index.json: each launch parameter becomes a buffer, a step symbol (T, S, R) or a constant, so a backend only
has to turn the bound launches into calls: driver launches (cuda, hip) or Triton-interpreter runs (interpret).
Nothing here imports torch, triton or the kernel pack; host-side arrays are numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from artifact_format.kernel_index import Entry, KernelIndex, Variant, eval_grid
from runtime.bound import BoundLaunch, BoundNode, BoundParam, BoundVariant
from runtime.errors import ArtifactError
from runtime.memory import ITEM_BYTES, Memory
from runtime.staging import ALIGN, Staged, aligned
from runtime.step import StepInput

SCRATCH_ALIGN = 256
# The scratch role that must be zero before each launch and is left zero after it (split-K semaphores): it gets a
# zeroed buffer of its own, shared by every node, which no other scratch overlaps (docs/artifact.md).
SEMAPHORES = "semaphores"
FEED_INDEX = "feed_index"  # staged with the step inputs, read only by feed_ids


class Program:
    """Buffers and bound launches for ``artifact`` in ``memory``, from one target's ``index`` (index.json).

    weights: name -> array in ``memory`` (weights.safetensors). Call ``allocate_kv(num_blocks)`` once the
    backend knows how many KV blocks fit; launches are bound then.
    """

    def __init__(self, artifact: Any, index: KernelIndex, memory: Memory, weights: dict[str, Any]):
        self.graph = artifact.graph
        self.index = index
        self.memory = memory
        self.weights = weights
        lim = artifact.manifest["limits"]
        self.max_batch: int = lim["max_batch"]
        self.max_num_tokens: int = lim["max_num_tokens"]
        self.block_size: int = lim["block_size"]
        self.decode_buckets = sorted(b for b in lim.get("decode_buckets", []) if b <= self.max_batch)
        self._max = {"T": self.max_num_tokens, "S": self.max_batch, "S+1": self.max_batch + 1, "R": self.max_batch}
        plan = artifact.manifest["memory_plan"]
        self.arena_bytes = plan["arena_bytes"]
        self.arena = memory.alloc(max(self.arena_bytes, ALIGN), zero=True)
        self.views = {t.name: self._arena_view(t, plan["offsets"]) for t in self.graph.tensors
                      if t.kind in ("activation", "output")}
        # [sampled ids of the last sampling run | this decode step's host ids]; feed_index rows index into it.
        self.token_pool = memory.typed((2 * self.max_batch,), "i32", zero=True)
        self.feed_runs: list[tuple[int, int, int]] = []  # the last load_step's fed rows: (row, pool row, count)
        self._alloc_inputs()
        out = self.graph.outputs[0]
        self.vocab_size = self.graph.tensor(out).shape[-1]
        self._logits = self.views[out]
        self.caches: dict[str, Any] = {}
        self.num_blocks = 0
        self.nodes: tuple[BoundNode, ...] = ()
        self.extras: dict[str, BoundNode] = {}
        self.extra_buffers: dict[str, dict[str, Any]] = {}
        self._extra_staged: dict[str, Staged] = {}
        self._launches: list[BoundLaunch] = []
        self._chosen: dict[tuple[str, int], list[BoundLaunch]] = {}

    # ----- allocation -----

    def _shape(self, shape: tuple, num_blocks: int = 0) -> tuple[int, ...]:
        sizes = {**self._max, "NB": num_blocks}
        try:
            return tuple(d if isinstance(d, int) else sizes[d] for d in shape)
        except KeyError as e:
            raise ArtifactError(f"graph dimension {e.args[0]!r} is unknown to this runtime: rebuild the artifact "
                                f"with a matching trilite version") from None

    def _arena_view(self, t: Any, offsets: dict[str, int]) -> Any:
        if t.name not in offsets:
            raise ArtifactError(f"the memory plan has no offset for tensor {t.name}: rebuild the artifact")
        shape, off = self._shape(t.shape), offsets[t.name]
        nbytes = math.prod(shape) * ITEM_BYTES[t.dtype]
        if off % ALIGN or off + nbytes > self.arena_bytes:
            raise ArtifactError(f"tensor {t.name} ({nbytes} bytes at offset {off}) does not fit the "
                                f"{self.arena_bytes}-byte arena 16-byte aligned: rebuild the artifact")
        return self.memory.view(self.arena, off, shape, t.dtype)

    def _alloc_inputs(self) -> None:
        """Step inputs are staged together so that a step's inputs travel in one copy."""
        specs = self.graph.by_kind("input")
        bad = [t.name for t in specs if t.dtype != "i32"]
        if bad:
            raise ArtifactError(f"step inputs {bad} are not int32: rebuild the artifact")
        feed = (FEED_INDEX, ((self.max_batch,), "i32"))  # not a graph input: travels in the same copy
        self._step = Staged(dict([*((t.name, (self._shape(t.shape), "i32")) for t in specs), feed]), self.memory)
        self.inputs = {k: v for k, v in self._step.views.items() if k != FEED_INDEX}
        self.feed_index = self._step.views[FEED_INDEX]
        self.max_blocks = self.inputs["block_tables"].shape[1] if "block_tables" in self.inputs else 0

    @property
    def kv_block_bytes(self) -> int:
        """Bytes one KV-cache block takes over every cache buffer (all layers, K and V)."""
        return sum(math.prod(self._shape(t.shape, 1)) * ITEM_BYTES[t.dtype] for t in self.graph.sources("cache"))

    def allocate_kv(self, num_blocks: int) -> None:
        """Allocate the caches ([num_blocks, block_size, Hk, Dh] each) and bind every launch to the buffers.

        Only the graph's source caches (k_cache.{i}, v_cache.{i}) get buffers: the names a cache-writing node
        gives them afterwards are the same storage (Graph.storage).
        """
        if self.nodes:
            raise RuntimeError("the KV cache is allocated once per Program")
        self.num_blocks = num_blocks
        self.caches = {t.name: self.memory.typed(self._shape(t.shape, num_blocks), t.dtype, zero=True)
                       for t in self.graph.sources("cache")}
        entries = self.index.entries()
        self.scratch = self.memory.alloc(max([self._scratch_bytes(v) for e in entries for v in e.variants] + [ALIGN]))
        self.semaphores = self.memory.typed((max([n for e in entries for v in e.variants
                                                  for r, (n, _) in v.scratch.items() if r == SEMAPHORES] + [1]),),
                                            "i32", zero=True)
        self._global_scratch = self._kernel_scratch(entries)
        by_name = {n.name: n for n in self.graph.nodes}
        nodes = []
        for entry in self.index.nodes:
            node = by_name.get(entry.node)
            if node is None:
                raise ArtifactError(f"index.json names node {entry.node}, which the graph lacks: "
                                    f"rebuild the artifact")
            roles = {role: self._tensor(name) for role, name in (*node.inputs, *node.outputs)}
            nodes.append(self._bind(entry, roles))
        if [n.name for n in nodes] != [n.name for n in self.graph.nodes]:
            raise ArtifactError("index.json does not list the graph's nodes in order: rebuild the artifact")
        self.nodes = tuple(nodes)
        for name, entry in self.index.extra.items():
            buffers = self._extra_buffers(name, entry)
            self.extra_buffers[name] = buffers
            self.extras[name] = self._bind(entry, {"logits": self._logits, **buffers})

    def _tensor(self, name: str) -> Any:
        kind = self.graph.tensor(name).kind
        if kind == "input":
            return self.inputs[name]
        if kind == "cache":
            return self.caches[self.graph.storage(name)]
        if kind == "weight":
            if name not in self.weights:
                raise ArtifactError(f"weights.safetensors has no tensor {name}: rebuild the artifact")
            return self.weights[name]
        return self.views[name]

    @staticmethod
    def _scratch_layout(variant: Variant) -> dict[str, tuple[int, int, str]]:
        layout, off = {}, 0
        for role, (numel, dt) in sorted(variant.scratch.items()):
            if role == SEMAPHORES:
                continue
            layout[role] = (off, numel, dt)
            off = aligned(off + numel * ITEM_BYTES[dt], SCRATCH_ALIGN)
        return layout

    def _scratch_bytes(self, variant: Variant) -> int:
        return max([o + n * ITEM_BYTES[dt] for o, n, dt in self._scratch_layout(variant).values()] + [0])

    def _kernel_scratch(self, entries: list[Entry]) -> dict[str, Any]:
        """Triton's global/profile scratch: ``size`` bytes per program of the largest grid, shared by launches."""
        need = {"global": 0, "profile": 0}
        for e in entries:
            for v in e.variants:
                for launch in v.launches:
                    b = self.index.binaries[launch.binary]
                    programs = math.prod(eval_grid(launch.grid, self._max))
                    for kind in need:
                        size = getattr(b, f"{kind}_scratch_size")
                        if size:
                            align = getattr(b, f"{kind}_scratch_align")
                            need[kind] = max(need[kind], aligned(programs * b.num_ctas * size, align))
        return {k: self.memory.typed((n,), "u8") if n else None for k, n in need.items()}

    def _extra_buffers(self, name: str, entry: Entry) -> dict[str, Any]:
        """Per-row buffers ([max_batch]) of an extra entry (sampling), typed by the pointer parameters.

        Inputs are staged (one upload for all of them); the output role "out" is a buffer of its own.
        """
        specs: dict[str, tuple[tuple[int, ...], str]] = {}
        for v in entry.variants:
            for launch in v.launches:
                for p in launch.params:
                    if p.kind == "tensor" and p.value != "logits" and p.value not in v.scratch:
                        specs.setdefault(p.value, ((self.max_batch,), p.type[1:]))
        out = {r: self.memory.typed(s, dt, zero=True) for r, (s, dt) in specs.items() if r == "out"}
        if name == "sampling" and specs.get("out", ((), "i32"))[1] == "i32":
            out["out"] = self.token_pool[:self.max_batch]
        self._extra_staged[name] = Staged({r: v for r, v in specs.items() if r != "out"}, self.memory)
        return {**self._extra_staged[name].views, **out}

    def _bind(self, entry: Entry, roles: dict[str, Any]) -> BoundNode:
        variants = []
        for v in entry.variants:
            scratch = {role: self.memory.view(self.scratch, o, (n,), dt)
                       for role, (o, n, dt) in self._scratch_layout(v).items()}
            if SEMAPHORES in v.scratch:
                if v.scratch[SEMAPHORES][1] != "i32":
                    raise ArtifactError(f"node {entry.node}: semaphores must be i32: rebuild the artifact")
                scratch[SEMAPHORES] = self.semaphores
            tensors = {**roles, **scratch}
            launches = []
            for launch in v.launches:
                binary = self.index.binaries[launch.binary]  # KernelIndex.from_json checked it is listed
                params = tuple(self._param(entry.node, p.name, p.type, p.kind, p.value, tensors)
                               for p in launch.params)
                scratch_of = {k: self._global_scratch[k] if getattr(binary, f"{k}_scratch_size") else None
                              for k in ("global", "profile")}
                bound = BoundLaunch(len(self._launches), entry.node, launch.binary, binary, params, launch.grid,
                                    scratch_of["global"], scratch_of["profile"])
                self._launches.append(bound)
                launches.append(bound)
            variants.append(BoundVariant(v.step, v.max_T, tuple(launches)))
        return BoundNode(entry.node, entry.op, tuple(variants))

    def _param(self, node: str, name: str, ty: str, kind: str, value: Any, tensors: dict[str, Any]) -> BoundParam:
        if kind == "tensor":
            if value not in tensors:
                raise ArtifactError(f"node {node}: parameter {name} is bound to role {value!r}, which the node "
                                    f"lacks: rebuild the artifact")
            t = tensors[value]
            held = self.memory.dtype_of(t)
            if not ty.startswith("*") or ty[1:] != held:
                raise ArtifactError(f"node {node}: parameter {name} is {ty} but role {value} holds {held}: "
                                    f"rebuild the artifact")
            return BoundParam(name, ty, kind, t)
        if kind not in ("sym", "int", "float"):
            raise ArtifactError(f"node {node}: parameter {name} has an unknown binding {kind!r}: rebuild the artifact")
        return BoundParam(name, ty, kind, value)

    # ----- per step -----

    def all_launches(self) -> list[BoundLaunch]:
        """Every bound launch of every variant (nodes and extras), indexed by ``uid``."""
        return list(self._launches)

    def launches(self, kind: str, env: dict[str, int]) -> list[BoundLaunch]:
        """The launches of one step, in order: per node, the first variant for this step kind and T."""
        key = (kind, env["T"])
        if key not in self._chosen:
            self._chosen[key] = [b for n in self.nodes for b in n.select(kind, env["T"]).launches]
        return self._chosen[key]

    def extra_launches(self, name: str, env: dict[str, int]) -> list[BoundLaunch]:
        return list(self.extras[name].select("any", env["T"]).launches)

    def load_step(self, step: StepInput, pad_to: int | None = None, feed: np.ndarray | None = None) -> dict[str, int]:
        """Copy a step's inputs into the static buffers; returns the env {T, S, R} the launches run with.

        pad_to (decode only): add rows up to a CUDA-graph bucket. Padding rows are masked by the kernels
        (docs/ops.md): slot_mapping -1, seq_lens 0, block table zeros, positions 0, ids 0, last_idx = row.
        feed ([n] int over the step's first n rows, each of one token: Backend.submit): row i's input id is the
        last sampling run's row feed[i] where that is >= 0, else ids[i]; ``feed_ids(n)`` applies it on the device,
        or the copies of ``feed_runs``. Without feed every row keeps its host id.
        """
        T, S, R = step.T, step.S, step.R
        if T > self.max_num_tokens or S > self.max_batch or R > self.max_batch:
            raise ValueError(f"step of T={T}, S={S}, R={R} exceeds the artifact's limits "
                             f"(max_num_tokens {self.max_num_tokens}, max_batch {self.max_batch})")
        n = pad_to or S
        if pad_to is not None and (step.kind != "decode" or R != S or not S <= pad_to <= self.max_batch):
            raise ValueError(f"only a decode step with R == S can be padded to a bucket, got {step.kind} "
                             f"S={S} R={R} pad_to={pad_to}")
        w = step.block_tables.shape[1]
        if w > self.max_blocks:
            raise ValueError(f"block tables are {w} wide, the artifact allows {self.max_blocks}")
        f = None if feed is None else np.asarray(feed)
        if f is not None and (not step.single_token_rows(len(f)) or (f >= self.max_batch).any()):
            raise ValueError(f"a feed maps each of a step's leading one-token rows to a sampled row below "
                             f"{self.max_batch}: got a {step.kind} step of cu_seqlens_q "
                             f"{step.cu_seqlens_q.tolist()} and feed {f.tolist()}")
        host = self._step.host()
        src = step.inputs()
        for name, pad in (("ids", 0), ("positions", 0), ("slot_mapping", -1), ("seq_lens", 0)):
            if name in host:
                host[name][:len(src[name])] = src[name]
                host[name][len(src[name]):n] = pad
        if "cu_seqlens_q" in host:
            host["cu_seqlens_q"][:S + 1] = src["cu_seqlens_q"]
            host["cu_seqlens_q"][S + 1:n + 1] = np.arange(T + 1, T + 1 + n - S)
        if "block_tables" in host:
            host["block_tables"][:S, :w] = src["block_tables"]
            host["block_tables"][:n, w:] = 0
            host["block_tables"][S:n] = 0
        if "last_idx" in host:
            host["last_idx"][:R] = src["last_idx"]
            if pad_to:
                host["last_idx"][R:n] = np.arange(R, n)
        rows = host[FEED_INDEX]
        rows[:n] = np.arange(self.max_batch, self.max_batch + n)
        self.feed_runs = []
        if f is not None:
            rows[:len(f)] = np.where(f >= 0, f, rows[:len(f)])
            self.feed_runs = feed_runs(f)
        self._step.upload()
        return {"T": n if pad_to else T, "S": n, "R": n if pad_to else R}

    def feed_ids(self, rows: int) -> None:
        """On the device: ids[:rows] = token_pool[feed_index[:rows]] (the interpret backend's decode steps; the
        fed rows of any other step).

        Two tiny ops, no host sync: the step's host ids go to the pool's second half, then one gather picks each
        row's id from there or from the last sampled ids (what ``load_step``'s feed asked for).
        """
        ids = self.inputs["ids"][:rows]
        self.memory.copy(self.token_pool[self.max_batch:self.max_batch + rows], ids)
        self.memory.gather(ids, self.token_pool, self.feed_index[:rows])

    def load_padding(self, rows: int) -> dict[str, int]:
        """Fill the step buffers with ``rows`` padding rows of a decode step (used to capture CUDA graphs)."""
        host = self._step.host()
        for name, pad in (("ids", 0), ("positions", 0), ("slot_mapping", -1), ("seq_lens", 0), ("block_tables", 0)):
            if name in host:
                host[name][:rows] = pad
        if "cu_seqlens_q" in host:
            host["cu_seqlens_q"][:rows + 1] = np.arange(rows + 1)
        if "last_idx" in host:
            host["last_idx"][:rows] = np.arange(rows)
        host[FEED_INDEX][:rows] = np.arange(self.max_batch, self.max_batch + rows)
        self.feed_runs = []
        self._step.upload()
        return {"T": rows, "S": rows, "R": rows}

    def load_sampling(self, R: int, logits: np.ndarray | None = None, **rows: np.ndarray) -> dict[str, int]:
        """Copy sampling parameters ([R] host arrays each, by role name) in one upload and, when given, the logits
        ([R, V] fp32 on the host, e.g. after a host-side penalty) over the last step's; else those are sampled."""
        if R > self.max_batch:
            raise ValueError(f"{R} rows to sample, the artifact allows {self.max_batch}")
        if logits is not None:
            logits = np.ascontiguousarray(logits, dtype=np.float32)
            if logits.shape != (R, self.vocab_size):
                raise ValueError(f"logits of shape {logits.shape} for {R} rows of {self.vocab_size}")
            self.memory.write(self._logits[:R], logits)
        staged = self._extra_staged.get("sampling")
        if staged is None:
            raise ArtifactError("this artifact's index.json has no sampling kernel: rebuild the artifact")
        host = staged.host()
        for role, value in rows.items():
            host[role][:R] = value
        staged.upload()
        return {"T": R, "S": R, "R": R}

    def logits(self, rows: int) -> Any:
        """The logits of the last step: [rows, V] fp32, a view of the arena that the next step overwrites."""
        return self._logits[:rows]

    def logits_host(self, rows: int) -> np.ndarray:
        """A host copy of the last step's logits [rows, V] fp32 (waits for the step)."""
        return self.memory.read(self._logits[:rows])

    def sampled_ids(self, rows: int) -> Any:
        """The last sampling run's ids [rows] int32, on the device."""
        return self.extra_buffers["sampling"]["out"][:rows]


def feed_runs(feed: np.ndarray) -> list[tuple[int, int, int]]:
    """(first row, first sampled row, count) of each run of rows whose feed takes consecutive sampled rows: the
    device-to-device copies that put a feed in place (one copy when a batch kept its order, as it mostly does)."""
    runs: list[list[int]] = []
    for row, src in enumerate(np.asarray(feed).tolist()):
        if src < 0:
            continue
        if runs and runs[-1][0] + runs[-1][2] == row and runs[-1][1] + runs[-1][2] == src:
            runs[-1][2] += 1
        else:
            runs.append([row, src, 1])
    return [tuple(r) for r in runs]
