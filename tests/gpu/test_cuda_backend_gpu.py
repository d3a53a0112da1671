"""The cuda backend on the GPU: a hand-made artifact (binaries compiled here) and, with the compiler, a tiny preset.

Tolerances: kernels and references both accumulate in fp32, so fp32 logits agree to rounding (1e-4 relative
to the logits' scale leaves room for different reduction orders over D = 96); fp16 activations round each
intermediate to 11 bits, so 1e-2. Graph replay runs the very same kernels on the same rows as an eager step,
so they must agree bit for bit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

V, D, MAX_T, MAX_B, BS, MAX_SEQ = 300, 96, 40, 4, 16, 64
EPS = 1e-5


class HandArtifact(SimpleNamespace):
    """Just what a backend reads from an Artifact."""

    def kernel_index(self, target: str):
        from artifact_format.kernel_index import KernelIndex

        return KernelIndex.from_json(self.index)

    def binary(self, target: str, file: str) -> bytes:
        return self.files[file]

    def weights(self) -> dict:
        return {k: v.clone() for k, v in self.tensors.items()}

    @property
    def path(self) -> Path:
        """A directory holding weights.safetensors, written once: the cuda backend copies from the file itself."""
        if "_dir" not in self.__dict__:
            from safetensors.torch import save_file

            self._dir = Path(tempfile.mkdtemp(prefix="trilite-hand-"))
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(self._dir / "weights.safetensors"))
        return self._dir

    def weight_ranges(self):
        from runtime.safetensors_file import read_header

        header = read_header(self.path / "weights.safetensors")
        with open(self.path / "weights.safetensors", "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
        graph_dtype = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
        return start, {n: (graph_dtype[h["dtype"]], tuple(h["shape"]), *h["data_offsets"]) for n, h in header.items()}


def _entry(plan, keys: list[str]) -> dict:
    launches = [{"binary": k, "params": [[n, dict(l.signature)[n], list(a)] for n, a in l.args],
                 "grid": [[list(t) for t in dim] for dim in l.grid]} for l, k in zip(plan.launches, keys)]
    return {"step": "any", "max_T": None, "scratch": {r: list(s) for r, s in plan.scratch}, "launches": launches}


def hand_artifact(dtype: str, targets: list[str] | None = None) -> HandArtifact:
    """embedding -> rms_norm -> logits (final norm + lm_head on last_idx rows), sampling as the extra entry."""
    from artifact_format.graph import Graph, Limits, Node, TensorSpec
    from compiler.aot import cache_key, compile_launch
    from compiler.build import local_target
    from kernels import embedding, logits, rms_norm, sampling

    target = local_target()
    i32 = lambda n, s: TensorSpec(n, "i32", s, "input")
    tensors = (i32("ids", ("T",)), i32("positions", ("T",)), i32("slot_mapping", ("T",)),
               i32("cu_seqlens_q", ("S+1",)), i32("seq_lens", ("S",)), i32("block_tables", ("S", MAX_SEQ // BS)),
               i32("last_idx", ("R",)), TensorSpec("emb", dtype, (V, D), "weight"),
               TensorSpec("norm1", dtype, (D,), "weight"), TensorSpec("final_norm", dtype, (D,), "weight"),
               TensorSpec("lm", dtype, (V, D), "weight"), TensorSpec("k_cache.0", dtype, ("NB", BS, 1, 8), "cache"),
               TensorSpec("h", dtype, ("T", D), "activation"), TensorSpec("y", dtype, ("T", D), "activation"),
               TensorSpec("logits", "fp32", ("R", V), "output"))
    nodes = (Node("embedding", (("ids", "ids"), ("weight", "emb")), (("out", "h"),), name="embed"),
             Node("rms_norm", (("x", "h"), ("w", "norm1")), (("out", "y"),), (("eps", EPS),), name="norm"),
             Node("logits", (("x", "y"), ("norm_w", "final_norm"), ("weight", "lm"), ("last_idx", "last_idx")),
                  (("out", "logits"),), (("eps", EPS),), name="head"))
    base = {"max_T": MAX_T, "max_S": MAX_B, "eps": EPS}
    plans = [(embedding, {**base, "V": V, "D": D}, {"ids": "i32", "weight": dtype, "out": dtype}),
             (rms_norm, {**base, "D": D}, {"x": dtype, "w": dtype, "out": dtype}),
             (logits, {**base, "D": D, "V": V}, {"x": dtype, "norm_w": dtype, "weight": dtype, "last_idx": "i32",
                                                 "out": "fp32"}),
             (sampling, {**base, "V": V}, {"logits": "fp32", "temperature": "fp32", "top_k": "i32", "top_p": "fp32",
                                          "min_p": "fp32", "seeds": "i64", "offsets": "i64", "out": "i32"})]
    binaries, files, entries = {}, {}, []
    for module, meta, dtypes in plans:
        plan = module.plan(meta, dtypes, module.default(meta))
        keys = []
        for launch in plan.launches:
            key = cache_key(launch, target)
            blob, md = compile_launch(launch, target)
            files[f"{key}.bin"] = blob
            binaries[key] = {**md, "file": f"{key}.bin", "module": launch.kernel.fn.__module__,
                             "kernel": launch.kernel.fn.__name__, "constexprs": dict(launch.constexprs)}
            keys.append(key)
        entries.append(_entry(plan, keys))
    index = {"target": str(target), "binaries": binaries,
             "nodes": [{"node": n.name, "op": n.op, "variants": [e]} for n, e in zip(nodes, entries)],
             "extra": {"sampling": {"node": "sampling", "op": "sampling", "variants": [entries[3]]}}}
    size = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    offsets = {"h": 0, "y": MAX_T * D * size, "logits": 2 * MAX_T * D * size}
    g = torch.Generator().manual_seed(7)
    tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    weights = {"emb": torch.randn(V, D, generator=g), "norm1": 1 + 0.1 * torch.randn(D, generator=g),
               "final_norm": 1 + 0.1 * torch.randn(D, generator=g), "lm": torch.randn(V, D, generator=g) / D**0.5}
    manifest = {"limits": {"max_seq_len": MAX_SEQ, "max_batch": MAX_B, "max_num_tokens": MAX_T, "block_size": BS,
                           "decode_buckets": [1, 2, 4]},
                "memory_plan": {"arena_bytes": offsets["logits"] + MAX_B * V * 4, "offsets": offsets}}
    return HandArtifact(name="hand", graph=Graph(nodes, tensors), manifest=manifest, index=index, files=files,
                        targets=targets or [str(target)], limits=Limits(MAX_SEQ, MAX_B, MAX_T, BS),
                        tensors={k: v.to(tdt) for k, v in weights.items()})


def reference(art: HandArtifact, step) -> torch.Tensor:
    w = {k: v.float() for k, v in art.tensors.items()}
    h = w["emb"][torch.from_numpy(step.ids).long()]
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w["norm1"]
    z = y[torch.from_numpy(step.last_idx).long()]
    return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * w["final_norm"]) @ w["lm"].T


def _decode(ids: list[int], start: int = 5):
    from runtime.step import Chunk, make_step

    return make_step("decode", [Chunk([t], start + i, [i]) for i, t in enumerate(ids)], BS, MAX_SEQ // BS)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_hand_artifact_prefill_decode_graphs_and_sampling(dtype, tol):
    from runtime.backends.cuda import CudaBackend
    from runtime.step import Chunk, make_step

    art = hand_artifact(dtype)
    backend = CudaBackend(art, max_blocks_total=9, cuda_graphs=False)
    assert backend.num_blocks == 9 and not backend._graphs and backend.target == art.index["target"]
    scale = lambda ref: tol * ref.abs().max().item()
    prefill = make_step("prefill", [Chunk([3, 1, 4, 1, 5, 9, 2], 0, [0]), Chunk([299, 0, 7, 7, 8], 0, [1])],
                        BS, MAX_SEQ // BS)
    out = backend.forward(prefill)
    ref = reference(art, prefill)
    assert isinstance(out, np.ndarray) and out.shape == (2, V) and out.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=scale(ref), rtol=0)

    steps = [_decode([17]), _decode([4, 250, 9]), _decode([1, 2]), _decode([6, 5, 4, 3])]
    eager = [backend.forward(s) for s in steps]  # host copies of their own
    for s, e in zip(steps, eager):
        torch.testing.assert_close(torch.from_numpy(e), reference(art, s), atol=scale(reference(art, s)), rtol=0)
    seconds = backend.capture_graphs()
    assert 0 < seconds < 30 and sorted(backend._graphs) == [1, 2, 4]
    for s, e in zip(reversed(steps), reversed(eager)):  # replays in another order than eager ran
        assert np.array_equal(backend.forward(s), e)

    logits = backend.forward(steps[3])
    rows = logits.shape[0]
    i64 = np.zeros(rows, np.int64)
    f32 = lambda v: np.full(rows, v, np.float32)
    greedy = backend.sample(logits, f32(0), np.zeros(rows, np.int32), f32(1), f32(0), i64 + 11, i64)
    assert greedy.dtype == np.int32 and np.array_equal(greedy, logits.argmax(-1))
    args = (f32(0.8), np.zeros(rows, np.int32), f32(1), f32(0), np.array([1, 2, 3, 4], np.int64), i64)
    first = backend.sample(logits, *args)
    assert np.array_equal(first, backend.sample(logits, *args)) and ((first >= 0) & (first < V)).all()


def test_missing_target_is_one_clear_sentence():
    from runtime.backends.cuda import CudaBackend
    from runtime.errors import ArtifactError

    art = hand_artifact("fp32", targets=["cuda:75"])
    major, minor = torch.cuda.get_device_capability()
    with pytest.raises(ArtifactError, match=f"artifact has kernels for cuda:75, this GPU is cuda:{major}{minor}: "
                                            f"recompile with --target cuda:{major}{minor}"):
        CudaBackend(art)


def test_kv_cache_gb_sizes_the_cache():
    from runtime.backends.cuda import CudaBackend

    backend = CudaBackend(hand_artifact("fp32"), kv_cache_gb=0.001)
    assert backend.capture_seconds > 0 and sorted(backend._graphs) == [1, 2, 4]  # captured by default
    per_block = BS * 1 * 8 * 4
    assert backend.num_blocks == int(0.001 * (1 << 30)) // per_block
    assert tuple(backend.program.caches["k_cache.0"].shape) == (backend.num_blocks, BS, 1, 8)


# ----- a built artifact: tiny random Llama through compiler.build, against the torch backend on the GPU -----

def _build(tmp_path_factory, dtype: str):
    from compiler.build import build, local_target
    from runtime.artifact import load_artifact

    out = build("tiny-llama", tmp_path_factory.mktemp(dtype) / "tiny", targets=[str(local_target())], dtype=dtype,
                max_seq_len=128, max_batch=4, autotune=False, reference=False)
    return load_artifact(out.out)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)  # every backend returns host arrays
    assert a.shape == b.shape and not np.isnan(a).any()
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _pair(artifact):
    from runtime.backends import make_backend

    return (make_backend("cuda", artifact, max_blocks_total=32, cuda_graphs=False),
            make_backend("torch", artifact, max_blocks_total=32, device="cuda"))


# fp32: the matmuls run in IEEE fp32 on both sides (no TF32), so only summation order differs: 1e-4 is a wide
# margin. bf16: each side rounds activations to 8 bits at different points (fused kernels keep fp32 longer),
# an error of a few 1e-3 per layer: 3e-2 over the whole model still fails on any real indexing bug.
@pytest.mark.parametrize("dtype,rel", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_built_artifact_matches_torch_backend_and_graphs_match_eager(tmp_path_factory, dtype, rel):
    from runtime.step import Chunk, make_step

    cuda, ref = _pair(_build(tmp_path_factory, dtype))
    vocab, width = cuda.program.vocab_size, cuda.program.max_blocks
    g = torch.Generator().manual_seed(1)
    tables = [[9, 2, 5], [11], [4, 6], [0]]
    lens = [37, 5, 20, 1]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    step = make_step("prefill", [Chunk(p, 0, t) for p, t in zip(prompts, tables)], 16, width)
    assert _rel(cuda.forward(step), ref.forward(step)) < rel
    decodes = []
    for k, rows in enumerate((4, 3, 2, 1)):  # buckets 4, 4, 2, 1; sequences drop out, positions stay contiguous
        chunks = [Chunk([(13 * k + i) % vocab], lens[i] + k, tables[i]) for i in range(rows)]
        decodes.append(make_step("decode", chunks, 16, width))
    eager = []
    for s in decodes:
        eager.append(cuda.forward(s))
        assert _rel(eager[-1], ref.forward(s)) < rel
    assert cuda.capture_graphs() < 30
    # replay the same steps: the cache already holds these tokens (rewritten with the same values)
    for s, e in zip(decodes, eager):
        assert np.array_equal(cuda.forward(s), e)


def test_greedy_generation_matches_torch_backend_token_for_token(tmp_path_factory):
    from runtime.step import Chunk, make_step

    cuda, ref = _pair(_build(tmp_path_factory, "fp32"))
    assert cuda.capture_graphs() > 0
    vocab, width = cuda.program.vocab_size, cuda.program.max_blocks
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (11, 26, 3)]
    tables = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]  # 26 + 24 tokens need 4 blocks
    outs = []
    for b in (cuda, ref):
        step = make_step("prefill", [Chunk(p, 0, t) for p, t in zip(prompts, tables)], 16, width)
        tokens, got = _greedy(b, b.forward(step)), []
        for k in range(24):
            got.append(tokens)
            chunks = [Chunk([tok], len(p) + k, t) for tok, p, t in zip(tokens, prompts, tables)]
            tokens = _greedy(b, b.forward(make_step("decode", chunks, 16, width)))
        outs.append(got)
    assert outs[0] == outs[1]


def _greedy(backend, logits: np.ndarray) -> list[int]:
    rows = logits.shape[0]
    z, z64 = np.zeros(rows, np.float32), np.zeros(rows, np.int64)
    return backend.sample(logits, z, np.zeros(rows, np.int32), np.ones(rows, np.float32), z, z64, z64).tolist()


@pytest.mark.parametrize("pdl", [False, True])
def test_engine_generates_the_same_tokens_on_cuda_as_on_torch(tmp_path_factory, pdl):
    """The whole path: runtime.load with backend cuda (graphs captured at load, the asynchronous decode loop),
    continuous batching, sampling; and the same launched with programmatic dependent launch (sm_90)."""
    import runtime

    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    artifact = _build(tmp_path_factory, "fp32")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300, 2], list(range(40, 73))]
    params = runtime.SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in runtime.load(artifact.path, backend="cuda", pdl=pdl).generate(prompts, params)]
    want = [o.token_ids for o in runtime.load(artifact.path, backend="torch", device="cuda").generate(prompts, params)]
    assert got == want and all(len(t) == 20 for t in got)


def test_pdl_binaries_are_marked_and_launch_identically_with_and_without_pdl(tmp_path_factory):
    """On sm_90 the matmul binaries are built with USE_PDL and marked in index.json; launching them with
    programmatic dependent launch (eager and inside the replayed decode graphs) gives the very same logits as
    launching the same binaries plainly, where their gdc_wait returns at once."""
    from runtime.backends import make_backend
    from runtime.step import Chunk, make_step

    artifact = _build(tmp_path_factory, "bf16")
    major = torch.cuda.get_device_capability()[0]
    index = artifact.kernel_index(f"cuda:{major}{torch.cuda.get_device_capability()[1]}")
    marked = {b.kernel for b in index.binaries.values() if b.pdl}
    if major < 9:
        assert not marked
        pytest.skip("programmatic dependent launch needs sm_90")
    # Every kernel of a decode step waits and triggers, so each launch edge overlaps (kernels/pdl.py).
    assert {"_linear_kernel", "_rms_norm_linear_kernel", "_embedding_kernel", "_attention_decode_kernel",
            "_logits_kernel", "_sampling_kernel"} <= marked
    on, off = (make_backend("cuda", artifact, max_blocks_total=32, cuda_graphs=False, pdl=p) for p in (True, False))
    assert any(s.kernel.pdl for s in on._sites) and not any(s.kernel.pdl for s in off._sites)
    vocab, width = on.program.vocab_size, on.program.max_blocks
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (19, 4)]
    tables = [[1, 2], [3]]
    outs = []
    for b in (on, off):
        got = [b.forward(make_step("prefill", [Chunk(p, 0, t) for p, t in zip(prompts, tables)], 16, width))]
        b.capture_graphs()
        for k in range(6):
            chunks = [Chunk([(7 * k + i) % vocab], len(p) + k, t) for i, (p, t) in enumerate(zip(prompts, tables))]
            got.append(b.forward(make_step("decode", chunks, 16, width)))
        outs.append(got)
    for a, b in zip(*outs):
        assert np.array_equal(a, b)
