"""Program: buffers, step loading and launch binding over a small hand-made graph and index.json.

The index is written by hand (no compiler) against two real kernels of the pack, so the last tests can run
the bound launches through the interpreter and compare with the maths.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from artifact_format.graph import Graph, Node, TensorSpec
from artifact_format.kernel_index import KernelIndex, eval_grid
from runtime.backends.torch_memory import TorchMemory
from runtime.errors import ArtifactError
from runtime.program import Program
from runtime.step import Chunk, make_step

D, I, MAX_T, MAX_B, MAX_BLOCKS, BS = 40, 20, 24, 4, 3, 16
SIZES = {"x": (MAX_T, D), "y": (MAX_T, D), "logits": (MAX_T, I)}


def _graph() -> Graph:
    i32 = lambda n, s: TensorSpec(n, "i32", s, "input")
    tensors = (
        i32("ids", ("T",)), i32("positions", ("T",)), i32("slot_mapping", ("T",)), i32("cu_seqlens_q", ("S+1",)),
        i32("seq_lens", ("S",)), i32("block_tables", ("S", MAX_BLOCKS)), i32("last_idx", ("R",)),
        TensorSpec("w", "fp32", (D,), "weight"),
        TensorSpec("k_cache.0", "fp16", ("NB", BS, 2, 8), "cache"),
        TensorSpec("v_cache.0", "fp16", ("NB", BS, 2, 8), "cache"),
        TensorSpec("x", "fp32", ("T", D), "activation"),
        TensorSpec("y", "fp32", ("T", D), "activation"),
        TensorSpec("logits", "fp32", ("T", I), "output"),
    )
    nodes = (
        Node("rms_norm", (("x", "x"), ("w", "w")), (("out", "y"),), (("eps", 1e-5),), name="norm"),
        Node("silu_mul", (("x", "y"),), (("out", "logits"),), name="act"),
        Node("attention", (("qkv", "y"), ("k_cache", "k_cache.0"), ("v_cache", "v_cache.0"),
                           ("seq_lens", "seq_lens"), ("block_tables", "block_tables")), (), name="attn"),
    )
    return Graph(nodes, tensors)


def _norm_launch(key: str = "norm") -> dict:
    return {"binary": key, "grid": [[["T", 1, 1]]],
            "params": [["x_ptr", "*fp32", ["tensor", "x"]], ["w_ptr", "*fp32", ["tensor", "w"]],
                       ["residual_ptr", "*fp32", ["tensor", "x"]], ["out_ptr", "*fp32", ["tensor", "out"]],
                       ["T", "i32", ["sym", "T"]], ["stride_x", "i64", ["int", D]], ["stride_res", "i64", ["int", D]],
                       ["stride_out", "i64", ["int", D]], ["eps", "fp32", ["float", 1e-5]]]}


def _act_launch(key: str, block: int) -> dict:
    return {"binary": key, "grid": [[["T", 1, 1]], [[None, 1, -(-I // block)]]],
            "params": [["x_ptr", "*fp32", ["tensor", "x"]], ["out_ptr", "*fp32", ["tensor", "out"]],
                       ["T", "i32", ["sym", "T"]], ["stride_x", "i64", ["int", 2 * I]],
                       ["stride_out", "i64", ["int", I]]]}


def _attn_launch(key: str) -> dict:
    return {"binary": key, "grid": [[["S", 4, 2], [None, 1, 1]]],
            "params": [["q_ptr", "*fp32", ["tensor", "qkv"]], ["k_ptr", "*fp16", ["tensor", "k_cache"]],
                       ["lens_ptr", "*i32", ["tensor", "seq_lens"]], ["tables_ptr", "*i32", ["tensor", "block_tables"]],
                       ["part_ptr", "*fp32", ["tensor", "partial"]], ["S", "i32", ["sym", "S"]],
                       ["R", "i32", ["sym", "R"]]]}


def _binary(kernel: str, module: str, **constexprs) -> dict:
    return {"file": "x.cubin", "name": kernel, "num_warps": 1, "num_ctas": 1, "shared": 0, "global_scratch_size": 0,
            "global_scratch_align": 1, "profile_scratch_size": 0, "profile_scratch_align": 1, "warp_size": 32,
            "module": module, "kernel": kernel, "constexprs": constexprs}


def _index() -> dict:
    binaries = {
        "norm": _binary("_rms_norm_kernel", "kernels.rms_norm", D=D, BLOCK_D=64, HAS_RESIDUAL=False),
        "act8": _binary("_glu_kernel", "kernels.silu_mul", I=I, BLOCK_I=8, USE_GELU=False),
        "act32": _binary("_glu_kernel", "kernels.silu_mul", I=I, BLOCK_I=32, USE_GELU=False),
        "dec": {**_binary("decode", "none"), "global_scratch_size": 24, "global_scratch_align": 128},
        "pre": _binary("prefill", "none"),
        "samp": _binary("sample", "none"),
    }
    nodes = [
        {"node": "norm", "op": "rms_norm", "variants": [{"step": "any", "max_T": None, "scratch": {},
                                                         "launches": [_norm_launch()]}]},
        {"node": "act", "op": "silu_mul", "variants": [
            {"step": "any", "max_T": 4, "scratch": {}, "launches": [_act_launch("act8", 8)]},
            {"step": "any", "max_T": None, "scratch": {}, "launches": [_act_launch("act32", 32)]}]},
        {"node": "attn", "op": "attention", "variants": [
            {"step": "decode", "max_T": MAX_B, "scratch": {"partial": [100, "fp32"]},
             "launches": [_attn_launch("dec")]},
            {"step": "prefill", "max_T": None, "scratch": {"partial": [7, "fp32"], "m": [3, "fp16"]},
             "launches": [_attn_launch("pre")]}]},
    ]
    roles = [("logits", "*fp32"), ("temperature", "*fp32"), ("top_k", "*i32"), ("seeds", "*i64"), ("out", "*i32")]
    sampling = {"node": "sampling", "op": "sampling", "variants": [{"step": "any", "max_T": None, "scratch": {},
                "launches": [{"binary": "samp", "grid": [[["S", 1, 1]]],
                              "params": [[f"{r}_ptr", ty, ["tensor", r]] for r, ty in roles]}]}]}
    return {"target": "cuda:90", "binaries": binaries, "nodes": nodes, "extra": {"sampling": sampling}}


def _artifact(graph: Graph | None = None) -> SimpleNamespace:
    offsets = {"x": 0, "y": MAX_T * D * 4, "logits": 2 * MAX_T * D * 4}
    manifest = {"limits": {"max_seq_len": MAX_BLOCKS * BS, "max_batch": MAX_B, "max_num_tokens": MAX_T,
                           "block_size": BS, "decode_buckets": [1, 2, 4, 8]},
                "memory_plan": {"arena_bytes": offsets["logits"] + MAX_T * I * 4 + 16, "offsets": offsets}}
    return SimpleNamespace(graph=graph or _graph(), manifest=manifest)


def _program(num_blocks: int = 5, index: dict | None = None, weights: dict | None = None) -> Program:
    g = torch.Generator().manual_seed(0)
    w = weights if weights is not None else {"w": 1 + 0.1 * torch.randn(D, generator=g)}
    p = Program(_artifact(), KernelIndex.from_json(index or _index()), TorchMemory(), w)
    p.allocate_kv(num_blocks)
    return p


def test_arena_views_sit_at_planned_offsets_with_dtype_and_max_shape():
    p = _program()
    offsets = _artifact().manifest["memory_plan"]["offsets"]
    for name, off in offsets.items():
        view = p.views[name]
        assert view.data_ptr() == p.arena.data_ptr() + off
        assert tuple(view.shape) == SIZES[name] and view.dtype == torch.float32
    p.views["y"].fill_(3.0)  # a write through a view lands in the arena bytes
    assert torch.equal(p.arena[offsets["y"]:offsets["y"] + 4].view(torch.float32), torch.tensor([3.0]))
    assert p.vocab_size == I and p.logits(3).data_ptr() == p.views["logits"].data_ptr()


def test_kv_caches_step_buffers_and_sizes():
    p = _program(num_blocks=7)
    assert set(p.caches) == {"k_cache.0", "v_cache.0"}
    assert tuple(p.caches["k_cache.0"].shape) == (7, BS, 2, 8) and p.caches["k_cache.0"].dtype == torch.float16
    assert p.kv_block_bytes == 2 * BS * 2 * 8 * 2
    shapes = {n: tuple(t.shape) for n, t in p.inputs.items()}
    assert shapes == {"ids": (MAX_T,), "positions": (MAX_T,), "slot_mapping": (MAX_T,), "cu_seqlens_q": (MAX_B + 1,),
                      "seq_lens": (MAX_B,), "block_tables": (MAX_B, MAX_BLOCKS), "last_idx": (MAX_B,)}
    assert all(t.data_ptr() % 16 == 0 for t in p.inputs.values())
    assert p.max_blocks == MAX_BLOCKS and p.decode_buckets == [1, 2, 4]


def test_load_step_prefill_copies_every_input():
    p = _program()
    step = make_step("prefill", [Chunk([5, 6, 7], 0, [2]), Chunk([8, 9], 17, [0, 4])], BS, MAX_BLOCKS)
    env = p.load_step(step)
    assert env == {"T": 5, "S": 2, "R": 2}
    for name, src in step.inputs().items():
        dst = p.inputs[name]
        if name == "block_tables":
            dst = dst[:2]
        assert torch.equal(dst[:len(src)], torch.from_numpy(src)), name
    assert p.inputs["slot_mapping"][:5].tolist() == [32, 33, 34, 65, 66]
    # every position's logits (R = T > S), continuing a cached prefix
    env = p.load_step(make_step("prefill", [Chunk([1, 2, 3], 5, [2])], BS, MAX_BLOCKS, all_logits=True))
    assert env == {"T": 3, "S": 1, "R": 3} and p.inputs["last_idx"][:3].tolist() == [0, 1, 2]


def test_load_step_decode_pads_rows_as_the_kernels_expect():
    p = _program()
    p.inputs["block_tables"].fill_(9)  # stale rows from an earlier step must not survive
    step = make_step("decode", [Chunk([11], 3, [1]), Chunk([12], 20, [2, 3])], BS, MAX_BLOCKS)
    env = p.load_step(step, pad_to=4)
    assert env == {"T": 4, "S": 4, "R": 4}
    assert p.inputs["ids"][:4].tolist() == [11, 12, 0, 0]
    assert p.inputs["positions"][:4].tolist() == [3, 20, 0, 0]
    assert p.inputs["slot_mapping"][:4].tolist() == [19, 52, -1, -1]
    assert p.inputs["seq_lens"].tolist() == [4, 21, 0, 0]
    assert p.inputs["block_tables"].tolist() == [[1, 0, 0], [2, 3, 0], [0, 0, 0], [0, 0, 0]]
    assert p.inputs["last_idx"].tolist() == [0, 1, 2, 3]
    assert p.inputs["cu_seqlens_q"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        p.load_step(make_step("prefill", [Chunk([1, 2], 0, [1])], BS, MAX_BLOCKS), pad_to=4)
    assert p.load_padding(2) == {"T": 2, "S": 2, "R": 2}
    assert p.inputs["slot_mapping"][:2].tolist() == [-1, -1] and p.inputs["seq_lens"][:2].tolist() == [0, 0]


def test_a_fed_decode_step_takes_its_ids_from_the_last_samples():
    p = _program()
    out = p.extra_buffers["sampling"]["out"]
    assert out.data_ptr() == p.token_pool.data_ptr() and out.shape == (MAX_B,)
    out.copy_(torch.tensor([70, 71, 72, 73], dtype=torch.int32))  # what the last sampling run wrote
    step = make_step("decode", [Chunk([-1], 3, [1]), Chunk([12], 20, [2, 3]), Chunk([-1], 5, [4])], BS, MAX_BLOCKS)
    env = p.load_step(step, pad_to=4, feed=np.array([2, -1, 0], dtype=np.int32))
    p.feed_ids(env["T"])
    assert p.inputs["ids"][:4].tolist() == [72, 12, 70, 0]  # fed, the host's, fed, padding
    p.load_step(step, pad_to=4)  # without a feed the gather leaves every host id
    p.feed_ids(4)
    assert p.inputs["ids"][:4].tolist() == [-1, 12, -1, 0]
    for bad in ([0, 1, 2, 3], [0, 1, MAX_B]):
        with pytest.raises(ValueError, match="feed"):
            p.load_step(step, feed=np.array(bad, dtype=np.int32))
    with pytest.raises(ValueError, match="feed"):  # a feed covers only leading one-token rows
        p.load_step(make_step("prefill", [Chunk([1, 2], 0, [1])], BS, MAX_BLOCKS), feed=np.array([0], dtype=np.int32))


def test_a_mixed_step_feeds_its_leading_decode_rows():
    """A prefill-kind step that starts with decode rows: the feed covers those, the prompt chunk keeps its ids."""
    p = _program()
    p.extra_buffers["sampling"]["out"].copy_(torch.tensor([70, 71, 72, 73], dtype=torch.int32))
    step = make_step("prefill", [Chunk([-1], 3, [1]), Chunk([12], 20, [2, 3]), Chunk([5, 6, 7], 0, [4])], BS,
                     MAX_BLOCKS)
    p.load_step(step, feed=np.array([1, -1], dtype=np.int32))
    p.feed_ids(2)
    assert p.inputs["ids"][:5].tolist() == [71, 12, 5, 6, 7]
    with pytest.raises(ValueError, match="feed"):
        p.load_step(step, feed=np.array([1, -1, 0], dtype=np.int32))


def test_every_parameter_binds_to_its_buffer():
    p = _program()
    norm = p.nodes[0].variants[0].launches[0]
    by_name = {q.name: q for q in norm.params}
    assert by_name["x_ptr"].value is p.views["x"] and by_name["out_ptr"].value is p.views["y"]
    assert by_name["w_ptr"].value is p.weights["w"]
    assert (by_name["T"].kind, by_name["T"].value) == ("sym", "T")
    assert (by_name["stride_x"].kind, by_name["stride_x"].value) == ("int", D)
    assert by_name["eps"].kind == "float" and by_name["eps"].value == pytest.approx(1e-5)
    assert norm.args({"T": 3, "S": 1, "R": 1})[4] == 3

    dec, pre = (v.launches[0] for v in p.nodes[2].variants)
    args = {q.name: q.value for q in dec.params}
    assert args["k_ptr"] is p.caches["k_cache.0"]
    assert args["lens_ptr"] is p.inputs["seq_lens"] and args["tables_ptr"] is p.inputs["block_tables"]
    part = args["part_ptr"]  # scratch: inside the shared buffer, 100 fp32 for decode
    assert part.numel() == 100 and part.untyped_storage().data_ptr() == p.scratch.untyped_storage().data_ptr()
    # prefill lays out its own roles in the same buffer (by name: m first), each 256-byte aligned
    assert {q.name: q.value for q in pre.params}["part_ptr"].data_ptr() == p.scratch.data_ptr() + 256
    # global scratch: 24 bytes for each of the ceil(4/4)*2+1 programs of the largest grid, rounded up to its align
    assert dec.global_scratch is not None and dec.global_scratch.numel() == 128
    assert pre.global_scratch is None and [launch.uid for launch in p.all_launches()] == list(range(6))

    samp = p.extras["sampling"].variants[0].launches[0]
    vals = {q.name: q.value for q in samp.params}
    assert vals["logits_ptr"] is p.views["logits"]
    assert vals["seeds_ptr"].dtype == torch.int64 and vals["top_k_ptr"].dtype == torch.int32
    assert vals["out_ptr"].shape == (MAX_B,)


def test_variant_choice_follows_step_kind_and_token_count():
    p = _program()
    keys = lambda kind, T: [launch.key for launch in p.launches(kind, {"T": T, "S": 1, "R": 1})]
    assert keys("prefill", 4) == ["norm", "act8", "pre"]
    assert keys("prefill", 5) == ["norm", "act32", "pre"]
    assert keys("decode", 3) == ["norm", "act8", "dec"]
    with pytest.raises(ArtifactError, match="no kernel variant"):
        keys("decode", 5)  # the decode variant stops at max_batch tokens


def test_grid_evaluation():
    assert eval_grid([[["T", 1, 1]], [[None, 1, 3]]], {"T": 5}) == (5, 3)
    assert eval_grid([[["S", 4, 2], [None, 1, 1]]], {"S": 5}) == (5,)
    assert eval_grid([[["T", 16, 1]], [["S", 1, 2]], [[None, 1, 7]]], {"T": 33, "S": 3}) == (3, 6, 7)


def test_binding_errors_are_artifact_errors():
    index = _index()
    index["nodes"][0]["variants"][0]["launches"][0]["params"][1][1] = "*fp16"
    with pytest.raises(ArtifactError, match="w_ptr is \\*fp16"):
        _program(index=index)
    with pytest.raises(ArtifactError, match="no tensor w"):
        _program(weights={})
    index = _index()
    index["nodes"][1]["variants"][0]["launches"][0]["params"][0][2] = ["tensor", "gate"]
    with pytest.raises(ArtifactError, match="role 'gate'"):
        _program(index=index)
    index = _index()
    index["nodes"].reverse()
    with pytest.raises(ArtifactError, match="in order"):
        _program(index=index)


@pytest.mark.parametrize("T", [1, 4, 5, MAX_T])
def test_bound_launches_run_in_the_interpreter(T):
    from runtime.backends.interpret import run_interpreted

    p = _program()
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g)
    p.views["x"][:T] = x
    p.views["y"].fill_(float("nan"))
    p.views["logits"].fill_(float("nan"))
    env = {"T": T, "S": 1, "R": 1}
    for launch in p.launches("prefill", env)[:2]:  # the attention launches name no real kernel
        run_interpreted(launch, env)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * p.weights["w"]
    gate, up = y[:, :I], y[:, I:]
    torch.testing.assert_close(p.logits(T), gate * torch.sigmoid(gate) * up, atol=1e-5, rtol=1e-5)
    assert p.views["logits"][T:].isnan().all()  # rows past T are not touched
