"""Artifact validation: a damaged, incomplete or foreign artifact fails with one sentence that says what to do."""

import json
import shutil

import pytest

from runtime.artifact import describe, load_artifact
from runtime.errors import ArtifactError
from tests.runtime.tiny_artifact import copy_artifact, tiny_artifact


@pytest.fixture(scope="module")
def built():
    return tiny_artifact()


@pytest.fixture
def copy(built, tmp_path):
    return copy_artifact(tmp_path / "art")


def _one_sentence(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and ": " in msg, msg
    return msg


def test_a_good_artifact_loads(built):
    a = load_artifact(built)
    assert a.targets == ["cuda:90"] and a.dtype == "fp32"
    assert (a.limits.max_seq_len, a.limits.max_batch, a.limits.block_size) == (128, 4, 16)
    assert sum(n.op == "attention" for n in a.graph.nodes) == 2
    weights = a.weights()
    assert {t.name for t in a.graph.by_kind("weight")} <= set(weights)
    index = a.kernel_index("cuda:90")
    some = next(iter(index.binaries.values()))
    assert a.binary("cuda:90", some.file)[:4] == b"\x7fELF"  # a cubin is an ELF image
    ids, logits = a.reference()
    assert logits.shape == (len(ids), a.graph.get_meta("vocab_size"))


def test_flipped_weight_byte_is_caught(copy):
    path = copy / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as e:
        load_artifact(copy)
    msg = _one_sentence(e)
    assert "weights.safetensors" in msg and "sha256" in msg and "compiler compile tiny-llama" in msg
    load_artifact(copy, check_hashes=False)  # without hashes the damage is not seen: the check is what catches it


def test_missing_kernel_binary_is_caught(copy):
    binary = next((copy / "kernels" / "cuda-90").glob("*.cubin"))
    binary.unlink()
    with pytest.raises(ArtifactError) as e:
        load_artifact(copy, check_hashes=False)
    msg = _one_sentence(e)
    assert f"kernels/cuda-90/{binary.name} is missing" in msg and "rebuild" in msg


def test_unknown_format_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as e:
        load_artifact(copy)
    assert _one_sentence(e) == ("artifact format 7 is not supported by this runtime (format 3): recompile it with "
                                "this version's compiler")


def test_missing_target_index_and_foreign_target(copy):
    a = load_artifact(copy)
    with pytest.raises(ArtifactError, match="has kernels for cuda:90, not cuda:80: recompile it with --target cuda:80"):
        a.kernel_index("cuda:80")
    shutil.rmtree(copy / "kernels")
    with pytest.raises(ArtifactError, match="kernels/cuda-90/.* is missing"):
        load_artifact(copy, check_hashes=False)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist: build an artifact"):
        load_artifact(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(tmp_path)


def test_manifest_naming_a_file_outside_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../escape"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        load_artifact(copy, check_hashes=False)


def test_describe(built):
    d = describe(load_artifact(built))
    assert d["graph"]["ops"]["attention"] == 2 and d["graph"]["nodes"] == sum(d["graph"]["ops"].values())
    assert d["kernels"]["cuda:90"]["binaries"] > 0 and d["kernels"]["cuda:90"]["bytes"] > 0
    assert d["weights"]["parameters"] == sum(w.numel() for w in load_artifact(built).weights().values())
    assert d["model"]["dtype"] == "fp32" and d["limits"]["max_batch"] == 4
