import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from artifact_format import layout
from compiler import fileio


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 5, generator=g).bfloat16(), "a": torch.randn(7, generator=g),
            "c": torch.randn(2, 3, generator=g).half(), "empty": torch.zeros(0, 4), "scalar": torch.tensor(3),
            "strided": torch.randn(4, 6, generator=g)[:, 1::2], "ids": torch.arange(5, dtype=torch.int32),
            "flags": torch.tensor([True, False])}


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_streamed_safetensors_are_save_file_bytes(tmp_path, metadata):
    tensors = _tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"), metadata=metadata)
    sha = fileio.save_tensors(tmp_path / "ours.safetensors", tensors, metadata)
    data = (tmp_path / "ours.safetensors").read_bytes()
    assert data == (tmp_path / "ref.safetensors").read_bytes()
    assert sha == hashlib.sha256(data).hexdigest()


def test_chunks_and_threads_do_not_change_the_bytes(tmp_path, monkeypatch):
    tensors = {f"w{i}": torch.randn(33, 17) for i in range(9)}
    one = fileio.save_tensors(tmp_path / "one.safetensors", tensors)
    monkeypatch.setattr(fileio, "CHUNK", 100)  # many chunks per tensor, hashed while written
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ThreadPoolExecutor(3) as pool:
        two = fileio.write_safetensors(tmp_path / "two.safetensors", specs, tensors.__getitem__, pool=pool, ahead=4)
    assert one == two and (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()


def test_a_made_tensor_must_match_its_header(tmp_path):
    with pytest.raises(ValueError, match="the header says"):
        fileio.write_safetensors(tmp_path / "x.safetensors", [("w", torch.float32, (2, 2))],
                                 lambda name: torch.zeros(2, 3))


def test_parallel_sha256_is_the_plain_sha256(tmp_path):
    files = []
    for i, size in enumerate((0, 1, 100, (1 << 20) + 7)):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    got = layout.sha256_files(files)
    assert got == {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert layout.file_sha256(files[-1], chunk=4096) == got[files[-1]]


def test_read_tensor_matches_safetensors(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = fileio.read_header(path)
    assert set(header) == set(tensors)
    with safe_open(str(path), framework="pt") as h:
        for name in tensors:
            got = fileio.read_tensor(path, header[name])
            assert got.dtype == tensors[name].dtype and torch.equal(got, h.get_tensor(name)), name
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        fileio.read_tensor(path, max(header.values(), key=lambda e: e[3]))


def test_bf16_checkpoint_folds_to_the_bytes_of_its_fp32_widening():
    # Weights stay in the checkpoint dtype through the passes; a fold still computes in fp32 and rounds once.
    from compiler.passes import optimize
    from tests.compiler.graph_eval import traced

    graph, weights, *_ = traced("llama", "bf16")
    bf16 = {k: v if k == "rope.cos_sin" else v.bfloat16() for k, v in weights.items()}
    _, got, _ = optimize(graph, bf16, "bf16")
    _, want, _ = optimize(graph, {k: v.float() for k, v in bf16.items()}, "bf16")
    assert got.keys() == want.keys() and all(got[k].dtype == want[k].dtype for k in got)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_stamp_and_recipe_name_the_generator(tmp_path, monkeypatch):
    from compiler.frontends import random_model
    from compiler.frontends.presets import PRESETS

    spec = PRESETS["tiny-llama"].random
    assert spec.device == "cpu" and spec.generator() == "cpu"
    assert all(PRESETS[n].random.device == "auto" for n in ("tinyllama-1.1b", "llama3-8b"))
    if not torch.cuda.is_available():
        assert PRESETS["llama3-8b"].random.generator() == "cpu"
    assert len({spec.recipe("cpu"), spec.recipe("cuda/132x2048"), spec.recipe("cuda/78x2048")}) == 3
    with pytest.raises(ValueError, match="device"):
        type(spec)(config=spec.config, seed=1, std=0.1, norm_std=0.1, device="gpu")
    # Pretend another generator made it (drawn on the CPU here): the stamp says which, and the recipe differs.
    real = random_model.make_tensor
    monkeypatch.setattr(random_model, "make_tensor", lambda s, n, shape, kind, generator: real(s, n, shape, kind))
    random_model.write_random_model(spec, tmp_path / "m", generator="cuda/1x1")
    stamp = json.loads((tmp_path / "m" / random_model.STAMP).read_text())
    assert stamp["generator"] == "cuda/1x1" and stamp["recipe"] == spec.recipe("cuda/1x1") != spec.recipe()
    sha = random_model.write_random_model(spec, tmp_path / "c")
    assert json.loads((tmp_path / "c" / random_model.STAMP).read_text()) == {"recipe": spec.recipe(), "sha256": sha}
