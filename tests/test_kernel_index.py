"""The typed kernel index refuses malformed index.json in one sentence (the loader turns it into ArtifactError)."""

import copy

import pytest

from artifact_format.kernel_index import IndexFormatError, KernelIndex, eval_grid

GOOD = {
    "target": "cuda:90", "triton": "3.6.0",
    "binaries": {"k": {"file": "k.cubin", "name": "_k", "num_warps": 4, "shared": 1024, "pdl": True,
                       "module": "kernels.linear", "kernel": "_k", "constexprs": {"BLOCK": 64}}},
    "nodes": [{"node": "n0", "op": "linear", "variants": [
        {"step": "decode", "max_T": 16, "scratch": {"partial": [128, "fp32"]},
         "launches": [{"binary": "k", "params": [["x_ptr", "*bf16", ["tensor", "x"]], ["T", "i32", ["sym", "T"]]],
                       "grid": [[["T", 16, 2], [None, 1, 1]], [[None, 1, 4]]]}]}]}],
    "extra": {},
}


def test_reads_fields_and_round_trips():
    index = KernelIndex.from_json(GOOD)
    b = index.binaries["k"]
    assert (b.file, b.num_warps, b.shared, b.pdl, b.warp_size, b.num_ctas) == ("k.cubin", 4, 1024, True, 32, 1)
    (launch,) = index.nodes[0].variants[0].launches
    assert [p.kind for p in launch.params] == ["tensor", "sym"]
    assert eval_grid(launch.grid, {"T": 33}) == (3 * 2 + 1, 4)
    again = KernelIndex.from_json(index.to_json())
    assert again == index


def _broken(edit):
    d = copy.deepcopy(GOOD)
    edit(d)
    return d


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("binaries"), "'binaries'"),
    (lambda d: d["binaries"]["k"].pop("num_warps"), "'num_warps'"),
    (lambda d: d["binaries"]["k"].update(shared=-1), "negative"),
    (lambda d: d["binaries"]["k"].update(num_warps=True), "'num_warps'"),
    (lambda d: d["nodes"][0]["variants"][0].update(step="sometimes"), "step"),
    (lambda d: d["nodes"][0]["variants"][0]["launches"][0].update(binary="gone"), "does not list"),
    (lambda d: d["nodes"][0]["variants"][0]["launches"][0]["params"][0].__setitem__(2, ["pickle", "x"]),
     "malformed parameter"),
    (lambda d: d["nodes"][0]["variants"][0]["launches"][0].update(grid=[[["Q", 1, 1]]]), "cannot evaluate"),
    (lambda d: d["nodes"][0]["variants"][0]["launches"][0].update(grid=[[["T", 0, 1]]]), "cannot evaluate"),
    (lambda d: d["nodes"][0]["variants"][0].update(scratch={"p": [1]}), "scratch"),
])
def test_malformed_index_is_one_clear_error(edit, match):
    with pytest.raises(IndexFormatError, match=match):
        KernelIndex.from_json(_broken(edit))
