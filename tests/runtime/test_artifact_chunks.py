"""Chunk digests in the manifest (manifest "chunks"): a big file is verified piece by piece on every core, an older
manifest without them by its whole sha256, and a compile leaves its files in the verified cache so the first start
reads none of them. Chunks are a few bytes here so that every file has several."""

import json

import pytest

import runtime.artifact as runtime_artifact
from artifact_format.layout import chunk_sha256s, file_sha256
from compiler.artifact import finish, staging_dir
from runtime.artifact import load_artifact
from runtime.errors import ArtifactError
from tests.runtime.tiny_artifact import copy_artifact

CHUNK = 4096


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRILITE_CACHE", str(tmp_path / "cache"))


def _chunked(art):
    """Give the copied artifact's manifest chunk digests of CHUNK bytes for every file bigger than that."""
    manifest = json.loads((art / "manifest.json").read_text())
    big = [art / rel for rel in manifest["files"] if (art / rel).stat().st_size > CHUNK]
    manifest["chunks"] = {"size": CHUNK, "sha256": {p.relative_to(art).as_posix(): d
                                                    for p, d in chunk_sha256s(big, CHUNK).items()}}
    (art / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _no_whole_file_hash(monkeypatch, chunked_only: bool = False):
    """Make a whole-file sha256 fail (with ``chunked_only``, of the weights only: small files have no chunks)."""
    def refuse(path, *a):
        if chunked_only and path.name != "weights.safetensors":
            return file_sha256(path, *a)
        raise AssertionError("a whole-file sha256 was taken")
    monkeypatch.setattr(runtime_artifact, "file_sha256", refuse)


def _refused(art, rel, **kw):
    with pytest.raises(ArtifactError) as e:
        load_artifact(art, **kw)
    msg = str(e.value)
    assert "\n" not in msg and rel in msg and "does not match its sha256" in msg, msg


@pytest.fixture
def chunked(tmp_path):
    art = copy_artifact(tmp_path / "art")
    manifest = _chunked(art)
    assert len(manifest["chunks"]["sha256"]["weights.safetensors"]) > 3
    return art


def test_chunked_file_verifies_by_chunks(chunked, monkeypatch):
    _no_whole_file_hash(monkeypatch, chunked_only=True)
    load_artifact(chunked)


@pytest.mark.parametrize("where", [0, 1, -2, "last"])
def test_damaged_byte_in_any_chunk_is_refused(chunked, monkeypatch, where):
    path = chunked / "weights.safetensors"
    data = bytearray(path.read_bytes())
    n = -(-len(data) // CHUNK)
    i = {0: 5, 1: CHUNK + 7, -2: (n - 2) * CHUNK + 1, "last": len(data) - 1}[where]
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    _no_whole_file_hash(monkeypatch, chunked_only=True)
    _refused(chunked, "weights.safetensors")


@pytest.mark.parametrize("change", [b"", b"\0", b"\0" * (CHUNK + 1)])
def test_truncated_or_extended_file_is_refused(chunked, change):
    path = chunked / "weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1] if not change else data + change)
    _refused(chunked, "weights.safetensors")


def test_rehash_checks_the_whole_file_too(chunked, monkeypatch):
    calls = []
    monkeypatch.setattr(runtime_artifact, "file_sha256", lambda p: calls.append(p.name) or file_sha256(p))
    load_artifact(chunked, rehash=True)
    assert "weights.safetensors" in calls
    manifest = json.loads((chunked / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = "0" * 64  # chunks still match, the whole digest does not
    (chunked / "manifest.json").write_text(json.dumps(manifest))
    _refused(chunked, "weights.safetensors", rehash=True)


def test_old_manifest_without_chunks_verifies_by_whole_file(tmp_path, monkeypatch):
    art = copy_artifact(tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest.pop("chunks", None)
    (art / "manifest.json").write_text(json.dumps(manifest))
    calls = []
    monkeypatch.setattr(runtime_artifact, "file_sha256", lambda p: calls.append(p.name) or file_sha256(p))
    monkeypatch.setattr(runtime_artifact, "chunk_sha256s", lambda *a: pytest.fail("chunks hashed"))
    load_artifact(art)
    assert "weights.safetensors" in calls
    data = bytearray((art / "weights.safetensors").read_bytes())
    data[100] ^= 0x01
    (art / "weights.safetensors").write_bytes(bytes(data))
    _refused(art, "weights.safetensors")


@pytest.mark.parametrize("bad", [[], {"size": 0, "sha256": {}}, {"size": CHUNK, "sha256": []},
                                 {"size": CHUNK, "sha256": {"weights.safetensors": []}},
                                 {"size": CHUNK, "sha256": {"nope.bin": ["00"]}},
                                 {"size": True, "sha256": {}}])
def test_malformed_chunks_entry_is_one_line(chunked, bad):
    manifest = json.loads((chunked / "manifest.json").read_text())
    manifest["chunks"] = bad
    (chunked / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as e:
        load_artifact(chunked)
    msg = str(e.value)
    assert "\n" not in msg and "malformed chunks" in msg, msg


def test_finish_writes_chunks_and_fills_the_verified_cache(tmp_path, monkeypatch):
    src = copy_artifact(tmp_path / "src")
    manifest = json.loads((src / "manifest.json").read_text())
    out = tmp_path / "out"
    stage = staging_dir(out)
    for rel in manifest["files"]:
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_bytes((src / rel).read_bytes())
    finish(stage, out, {k: v for k, v in manifest.items() if k != "files"}, chunk=CHUNK)
    written = json.loads((out / "manifest.json").read_text())
    assert written["files"] == manifest["files"]  # whole-file digests as sha256sum prints them
    pieces = written["chunks"]["sha256"]["weights.safetensors"]
    assert written["chunks"]["size"] == CHUNK and len(pieces) == -(-(out / "weights.safetensors").stat().st_size
                                                                   // CHUNK)
    assert all((out / rel).stat().st_size > CHUNK for rel in written["chunks"]["sha256"])
    _no_whole_file_hash(monkeypatch)
    monkeypatch.setattr(runtime_artifact, "chunk_sha256s", lambda *a: pytest.fail("chunks hashed"))
    load_artifact(out)  # the first start after the compile reads no file
    monkeypatch.setattr(runtime_artifact, "chunk_sha256s", chunk_sha256s)
    calls = []
    monkeypatch.setattr(runtime_artifact, "file_sha256", lambda p: calls.append(p.name) or file_sha256(p))
    load_artifact(out, rehash=True)  # `runtime verify` still reads them all, the chunked one whole as well
    assert sorted(calls) == sorted(rel.rsplit("/", 1)[-1] for rel in written["files"])


def test_compile_succeeds_with_an_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TRILITE_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    src = copy_artifact(tmp_path / "src")
    manifest = json.loads((src / "manifest.json").read_text())
    out = tmp_path / "out"
    stage = staging_dir(out)
    for rel in manifest["files"]:
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_bytes((src / rel).read_bytes())
    finish(stage, out, {k: v for k, v in manifest.items() if k != "files"}, chunk=CHUNK)
    load_artifact(out)


def test_build_fills_the_verified_cache(tmp_path, monkeypatch):
    from compiler.build import build

    out = build("tiny-llama", tmp_path / "tiny", targets=["cuda:90"], dtype="fp32", max_seq_len=128,
                max_batch=4, reference=False).out
    _no_whole_file_hash(monkeypatch)
    monkeypatch.setattr(runtime_artifact, "chunk_sha256s", lambda *a: pytest.fail("chunks hashed"))
    load_artifact(out)
