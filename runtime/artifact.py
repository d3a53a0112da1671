"""Load and validate an artifact directory (docs/artifact.md, "What the loader checks"): format, listed files,
their hashes, targets; the weights against the graph when they are read.

Every problem is an ArtifactError whose message is one sentence saying what to do. Only JSON and
safetensors are read (plus the ONNX graph through protobuf): nothing here unpickles. Only files the
manifest lists (and so hashes) are ever opened: ``Artifact.file`` is the one way to name one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from artifact_format.graph import QUANT_PAIRS, Limits
from artifact_format.kernel_index import IndexFormatError, KernelIndex
from artifact_format.layout import FORMAT, LIMIT_KEYS, REQUIRED_FILES, chunk_sha256s, file_sha256, target_dir
from artifact_format.verified import VerifiedCache
from runtime.errors import ArtifactError
from runtime.safetensors_file import HeaderError, check_against, read_header

if TYPE_CHECKING:
    from torch import Tensor

MAX_JSON_BYTES = 256 << 20  # manifest.json and index.json are kilobytes to a few megabytes


class _Verified:
    """Checks files against the manifest, skipping those this machine verified before and that are unchanged since
    (artifact_format.verified: keyed by path and stat). `runtime verify` (``rehash``) reads every file again.

    A file with chunk digests is checked piece by piece on every core (its size first: the pieces must cover it
    exactly); a file without (an older artifact, a small file), and every file under ``rehash``, by its whole sha256.
    """

    def __init__(self, enabled: bool, chunk: int = 0, chunks: dict[str, list[str]] | None = None):
        self.cache = VerifiedCache(enabled)
        self.rehash = not enabled
        self.chunk, self.chunks = chunk, chunks or {}

    def matches(self, path: Path, rel: str, digest: str) -> bool:
        if self.cache.known(path, digest):
            return True
        pieces = self.chunks.get(rel)
        if pieces is not None:
            if -(-path.stat().st_size // self.chunk) != len(pieces):
                return False
            if chunk_sha256s([path], self.chunk)[path] != pieces:
                return False
        if (pieces is None or self.rehash) and file_sha256(path) != digest:
            return False
        self.cache.record(path, digest)
        return True

    def save(self) -> None:
        self.cache.save()


def _chunks(manifest: dict, files: dict, path: Path, hint: str) -> tuple[int, dict[str, list[str]]]:
    """(chunk size, rel -> piece digests) of the manifest's optional "chunks" section, checked."""
    section = manifest.get("chunks")
    if section is None:
        return 0, {}
    size = section.get("size") if isinstance(section, dict) else None
    table = section.get("sha256") if isinstance(section, dict) else None
    if (not isinstance(size, int) or isinstance(size, bool) or size <= 0 or not isinstance(table, dict)
            or not all(rel in files and isinstance(v, list) and v and all(isinstance(d, str) for d in v)
                       for rel, v in table.items())):
        raise ArtifactError(f"{path}/manifest.json has a malformed chunks entry: {hint}")
    return size, table


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)

    @property
    def dtype(self) -> str:
        return self.manifest["model"]["dtype"]

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["targets"])

    @property
    def limits(self) -> Limits:
        return Limits(**{k: int(self.manifest["limits"][k]) for k in LIMIT_KEYS})

    def file(self, rel: str) -> Path | None:
        """The path of ``rel`` if the manifest lists it (load_artifact checked it is there and inside), else None."""
        return self.path / rel if rel in self.manifest["files"] else None

    @property
    def rebuild_hint(self) -> str:
        return _rebuild_hint(self.path, self.manifest)

    @cached_property
    def graph(self) -> Any:
        """The static graph (artifact_format.graph.Graph) read from graph.onnx."""
        import onnx

        from artifact_format.onnx_io import from_onnx

        try:
            return from_onnx(onnx.load(str(self.path / "graph.onnx")))
        except Exception as e:  # protobuf and from_onnx fail in many ways on damaged bytes; each means unreadable
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ArtifactError(f"graph.onnx of {self.path} cannot be read ({detail}): {self.rebuild_hint}") from e

    def safetensors_header(self, rel: str) -> dict[str, dict]:
        """The checked header of the listed safetensors file ``rel`` (ArtifactError if malformed)."""
        try:
            return read_header(self.path / rel)
        except HeaderError as e:
            raise ArtifactError(f"{rel} in {self.path} is not a valid safetensors file ({e}): "
                                f"{self.rebuild_hint}") from None

    def weights(self, device: str = "cpu") -> dict[str, Tensor]:
        """Every weight by graph tensor name, as stored (transformed, in the model dtype), as torch tensors (the
        torch and interpret backends; the cuda backend copies ``weight_ranges`` instead).

        Before a byte of tensor data is read, the header is checked and every tensor's dtype and shape are
        compared with the graph's weight of that name: a mismatch is an ArtifactError naming the tensor."""
        from safetensors.torch import load_file

        self.weight_ranges()
        return load_file(str(self.path / "weights.safetensors"), device=device)

    def weight_ranges(self) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
        """(byte offset of the data section in weights.safetensors, graph weight name -> (graph dtype, shape,
        begin, end) with begin/end relative to that offset), checked against the graph as ``weights`` does."""
        header = self.safetensors_header("weights.safetensors")
        weights = self.graph.by_kind("weight")
        why = check_against(header, {t.name: (t.dtype, t.shape) for t in weights})
        if why:
            raise ArtifactError(f"weights.safetensors in {self.path} {why}: {self.rebuild_hint}")
        with open(self.path / "weights.safetensors", "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
        return start, {t.name: (t.dtype, tuple(t.shape), *header[t.name]["data_offsets"]) for t in weights}

    def kernel_index(self, target: str) -> KernelIndex:
        """kernels/TARGET/index.json of a target the artifact was compiled for, checked."""
        if target not in self.targets:
            raise ArtifactError(f"artifact {self.name} has kernels for {', '.join(self.targets)}, not {target}: "
                                f"recompile it with --target {target}")
        rel = f"{target_dir(target)}/index.json"
        try:
            index = KernelIndex.from_json(_read_json(self.path / rel, rel, self.rebuild_hint))
        except IndexFormatError as e:
            raise ArtifactError(f"{rel} in {self.path} is malformed ({e}): {self.rebuild_hint}") from None
        for b in index.binaries.values():
            if self.file(f"{target_dir(target)}/{b.file}") is None:
                raise ArtifactError(f"{rel} in {self.path} names a binary the manifest does not list: "
                                    f"{self.rebuild_hint}")
        return index

    def binary(self, target: str, file: str) -> bytes:
        path = self.file(f"{target_dir(target)}/{file}")
        if path is None:
            raise ArtifactError(f"{target_dir(target)}/{file} is not listed in {self.path}/manifest.json: "
                                f"{self.rebuild_hint}")
        return path.read_bytes()

    def reference(self) -> tuple[list[int], np.ndarray]:
        """(prompt ids, fp32 logits [len, V] as a numpy array) the artifact was checked against when it was built."""
        from safetensors.numpy import load_file

        ref = self.manifest.get("reference")
        if not isinstance(ref, dict) or "reference.safetensors" not in self.manifest["files"]:
            raise ArtifactError(f"artifact {self.name} holds no reference logits: {self.rebuild_hint}")
        ids = ref.get("prompt_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise ArtifactError(f"manifest.json of {self.path} has no valid reference prompt_ids: {self.rebuild_hint}")
        vocab = self.graph.get_meta("vocab_size")
        why = check_against(self.safetensors_header("reference.safetensors"), {"logits": ("fp32", (len(ids), vocab))})
        if why:
            raise ArtifactError(f"reference.safetensors in {self.path} {why}: {self.rebuild_hint}")
        return ids, load_file(str(self.path / "reference.safetensors"))["logits"]


def _rebuild_hint(path: Path, manifest: dict) -> str:
    model = manifest.get("model")
    source = model.get("source") if isinstance(model, dict) else None
    source = source if isinstance(source, str) and source else "MODEL"
    return f"rebuild it with `compiler compile {source} --out {path}`"


def _read_json(path: Path, rel: str, hint: str) -> dict:
    """A listed JSON file as a dict, bounded in size; ArtifactError naming ``rel`` otherwise."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ArtifactError(f"{rel} in {path.parent} is larger than any artifact writes: {hint}")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"{rel} in {path.parent} is not valid JSON ({type(e).__name__}): {hint}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{rel} in {path.parent} is not a JSON object: {hint}")
    return obj


def _inside(root: Path, rel: str) -> bool:
    """Whether ``root/rel``, symlinks followed, stays inside the artifact (a link may not lead out of it)."""
    try:
        return (root / rel).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def load_artifact(path: str | Path, check_hashes: bool = True, rehash: bool = False) -> Artifact:
    """Read manifest.json and check the artifact before anything uses it.

    Checks: the format version, that every file the manifest lists exists (and, with ``check_hashes``, has the
    recorded sha256, or for a big file the recorded sha256 of each chunk), the required files, the limits and each
    target's index.
    Files hashed before on this machine and unchanged since are not read again unless ``rehash``.
    """
    path = Path(path)
    if not (path / "manifest.json").is_file():
        what = "does not exist" if not path.exists() else "has no manifest.json"
        raise ArtifactError(f"{path} {what}: build an artifact with `compiler compile MODEL --out {path}`")
    if not _inside(path, "manifest.json"):
        raise ArtifactError(f"{path}/manifest.json is a link that leads out of the artifact: copy the artifact "
                            f"as real files, or {_rebuild_hint(path, {})}")
    manifest = _read_json(path / "manifest.json", "manifest.json", _rebuild_hint(path, {}))
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise ArtifactError(f"artifact format {fmt} is not supported by this runtime (format {FORMAT}): "
                            f"recompile it with this version's compiler")
    hint = _rebuild_hint(path, manifest)
    for key in ("files", "targets", "limits", "model"):
        if not isinstance(manifest.get(key), dict if key != "targets" else list):
            raise ArtifactError(f"{path}/manifest.json has no valid {key!r} entry: {hint}")
    missing_limits = [k for k in LIMIT_KEYS if not isinstance(manifest["limits"].get(k), int)]
    if missing_limits or "dtype" not in manifest["model"]:
        raise ArtifactError(f"{path}/manifest.json lacks {missing_limits or ['model.dtype']}: {hint}")
    plan = manifest.get("memory_plan")
    if (not isinstance(plan, dict) or not isinstance(plan.get("arena_bytes"), int)
            or not isinstance(plan.get("offsets"), dict)
            or not all(isinstance(v, int) and v >= 0 for v in plan["offsets"].values())):
        raise ArtifactError(f"{path}/manifest.json has no valid memory_plan: {hint}")
    files: dict = manifest["files"]
    if not all(isinstance(t, str) for t in manifest["targets"]) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ArtifactError(f"{path}/manifest.json has malformed targets or files entries: {hint}")
    needed = [*REQUIRED_FILES, *(f"{target_dir(t)}/index.json" for t in manifest["targets"])]
    for rel in needed:
        if rel not in files:
            raise ArtifactError(f"artifact {path} does not list {rel} in its manifest: {hint}")
    verified = _Verified(not rehash, *_chunks(manifest, files, path, hint))
    for rel, digest in sorted(files.items()):
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts:
            raise ArtifactError(f"{path}/manifest.json names a file outside the artifact ({rel}): {hint}")
        if not _inside(path, rel):
            raise ArtifactError(f"artifact file {rel} in {path} is a link that leads out of the artifact: copy the "
                                f"artifact as real files, or {hint}")
        if not (path / rel).is_file():
            raise ArtifactError(f"artifact file {rel} is missing from {path}: {hint}")
        if check_hashes and not verified.matches(path / rel, rel, digest):
            raise ArtifactError(f"artifact file {rel} in {path} does not match its sha256 in manifest.json (damaged "
                                f"or edited): copy the artifact again or {hint}")
    verified.save()
    return Artifact(path, manifest)


def _scheme(node) -> str:
    """A matmul node's weight scheme as inspect shows it: none, int8, or int4 / int8_group with its group size
    (int4/g128)."""
    quant = node.attr("quant") or "none"
    return f"{quant}/g{node.attr('group_size')}" if quant in ("int4", "int8_group") else quant


def describe(artifact: Artifact) -> dict:
    """What ``runtime inspect`` shows: manifest facts, graph ops, kernels per target, weight sizes, the weight scheme
    of the matmul nodes (attr quant) and of the embedding table and lm_head (tables), and the weight bytes one decode
    step reads (int8 at one byte, int4 at half a byte, scales and mins included)."""
    from collections import Counter

    from runtime.bench import decode_weight_bytes

    m = artifact.manifest
    graph = artifact.graph
    kernels = {}
    for target in artifact.targets:
        index = artifact.kernel_index(target)
        files = {b.file for b in index.binaries.values()}
        size = sum((artifact.path / target_dir(target) / f).stat().st_size for f in files)
        launches = sum(len(v.launches) for n in index.nodes for v in n.variants)
        kernels[target] = {"binaries": len(files), "bytes": size, "launch sites": launches}
    header = artifact.safetensors_header("weights.safetensors")
    # Parameters of the model, not stored elements: a packed int4 byte holds two, scales and mins are none.
    quantized = [(n, pair) for n in graph.nodes if n.attr("quant") for pair in QUANT_PAIRS.get(n.op, ())]
    scales = {n.input(pair[1]) for n, pair in quantized}
    packed = {n.input(pair[0]) for n, pair in quantized if n.attr("quant") == "int4"}
    numel = sum(math.prod(t["shape"]) * (2 if name in packed else 1) for name, t in header.items()
                if name not in scales)
    return {
        "name": artifact.name,
        "format": m["format"],
        "model": {k: m["model"].get(k) for k in ("architecture", "family", "dtype", "source")},
        "build": m.get("build", {}),
        "targets": artifact.targets,
        "limits": m["limits"],
        "graph": {"nodes": len(graph.nodes), "ops": dict(Counter(n.op for n in graph.nodes).most_common()),
                  "layers": graph.get_meta("num_layers"), "vocab_size": graph.get_meta("vocab_size")},
        "kernels": kernels,
        "weights": {"tensors": len(header), "parameters": numel,
                    "bytes": (artifact.path / "weights.safetensors").stat().st_size,
                    "quant": m["model"].get("quant", "none"),
                    "schemes": dict(Counter(_scheme(n) for n in graph.nodes if n.op in ("linear", "rms_norm_linear"))),
                    "tables": {n.op: _scheme(n) for n in graph.nodes if n.op in ("embedding", "logits")},
                    "decode_bytes": decode_weight_bytes(graph),
                    # --quant gguf: the source tensors' GGUF types and the layouts they are served in
                    "gguf": dict(Counter(f"{t} -> {r['scheme']}/g{r['group_size']}" if r["op"] == "repack_gguf" else
                                         f"{t} -> dequantized"
                                         for r in m["model"].get("transforms", [])
                                         if r["op"] in ("repack_gguf", "gguf_dequantized")
                                         for t in r["gguf_types"].values()))},
    }
