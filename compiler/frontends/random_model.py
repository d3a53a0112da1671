"""Seeded random-weight models written as HF directories, so HF transformers loads the very same model.

Every tensor has its own generator seeded from (seed, tensor name): the bytes do not depend on the order
in which tensors are made, so threads make them in parallel and the shards are written (and hashed on the way
out) side by side, a few tensors in memory at a time. Big presets are made by the GPU's generator when there is
one: its bytes differ from the CPU's (and depend on the GPU's SM count, which sets the kernel's grid), so the
stamp and the recipe name the generator and a cache made by another one is never taken for this one's.
The tokenizer is a byte-level BPE trained on a small corpus kept here, which is deterministic too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from artifact_format.layout import workers
from compiler import fileio
from compiler.frontends import hf

GENERATOR_VERSION = 1  # bump when the bytes written for the same spec change
STAMP = "trilite_preset.json"
TOKENIZER_VOCAB = 320
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
What is the capital of France? The capital of France is Paris, a city on the river Seine.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
A language model reads a sequence of tokens and predicts the next one, again and again.
Kernels are compiled ahead of time, so the runtime only loads binaries and launches them.
The weather today is cold and clear; tomorrow there will be rain in the morning and wind at night.
She counted the numbers one, two, three, four, five, six, seven, eight, nine and ten.
1 2 3 4 5 6 7 8 9 10 100 1000 2048 4096 3.14 2.71 -1 +1 = < > ( ) [ ] { } ; : , . ! ? ' " / \\ | _ @ # $ % & *
def main(): return sum(x * x for x in range(10))
Hello! How are you? I am fine, thank you. What would you like to talk about today?
The train left the station at nine o'clock and arrived in the mountains before noon.
Water boils at one hundred degrees and freezes at zero degrees at the level of the sea.
The library has many books about history, science, music, cooking and the stars.
When the memory of the GPU is full, new requests wait until blocks are free again.
Attention compares every query with the keys of the tokens before it and mixes their values.
"""


@dataclass(frozen=True)
class RandomModelSpec:
    """How to make one random model: its HF config and the distribution of its weights."""

    config: dict
    seed: int
    std: float  # linear, embedding and bias weights ~ N(0, std)
    norm_std: float  # norm scales ~ 1 + N(0, norm_std), so a kernel that ignores them fails
    dtype: str = "float32"
    shard_bytes: int = 2 << 30
    # The embedding's std where it differs from std: Gemma scales embeddings by sqrt(hidden_size), and a tied table
    # of std 0.2 would then outweigh every layer (greedy decoding repeats its first token forever).
    embed_std: float | None = None
    device: str = "cpu"  # "cpu": the CPU's generator everywhere; "auto": the GPU's when one is present
    # Compiled straight from the generator, no HF directory written (compiler/frontends/random_direct.py): the bytes
    # are the same either way, so this stays out of the recipe.
    direct: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "auto"):
            raise ValueError(f"RandomModelSpec.device must be 'cpu' or 'auto', not {self.device!r}")

    def generator(self) -> str:
        """Which generator makes this model here: "cpu", or "cuda/{SMs}x{threads per SM}" (the grid it uses)."""
        if self.device == "auto" and torch.cuda.is_available() and not torch.version.hip:
            props = torch.cuda.get_device_properties(0)
            return f"cuda/{props.multi_processor_count}x{props.max_threads_per_multi_processor}"
        return "cpu"

    def recipe(self, generator: str = "cpu") -> str:
        fields = {"config": self.config, "seed": self.seed, "std": self.std, "norm_std": self.norm_std,
                  "dtype": self.dtype, "shard_bytes": self.shard_bytes, "version": GENERATOR_VERSION,
                  "corpus": hashlib.sha256(_CORPUS.encode()).hexdigest()}
        if generator != "cpu":  # the CPU's recipe stays what it was before GPU generation existed
            fields["generator"] = generator
        if self.embed_std is not None:  # likewise for presets without their own embedding std
            fields["embed_std"] = self.embed_std
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def parameter_shapes(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) for every parameter; kind is "embed", "linear", "bias", "norm" or "offset_norm"
    (Gemma's norms, which scale by 1 + w)."""
    h, v, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or h // heads
    bias = (config["model_type"] == "qwen2" or config.get("attention_bias", False)
            or (config["model_type"] == "qwen2_moe" and config.get("qkv_bias", True)))
    phi3 = config["model_type"] == "phi3"
    gemma = config["model_type"] in ("gemma2", "gemma3_text")
    norm = "offset_norm" if gemma else "norm"
    out = [("model.embed_tokens.weight", (v, h), "embed")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (h,), norm))
        if phi3:  # Phi-3 checkpoints keep q, k, v in one matrix (and gate, up in another, below)
            out.append((p + "self_attn.qkv_proj.weight", ((heads + 2 * kv) * hd, h), "linear"))
        for proj, rows in () if phi3 else (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            out.append((p + f"self_attn.{proj}_proj.weight", (rows, h), "linear"))
            if bias:
                out.append((p + f"self_attn.{proj}_proj.bias", (rows,), "bias"))
        if config["model_type"] in ("qwen3", "qwen3_moe", "gemma3_text"):
            out += [(p + "self_attn.q_norm.weight", (hd,), norm), (p + "self_attn.k_norm.weight", (hd,), norm)]
        out.append((p + "self_attn.o_proj.weight", (h, heads * hd), "linear"))
        out.append((p + "post_attention_layernorm.weight", (h,), norm))
        if gemma:  # the sandwich norms around the MLP
            out += [(p + "pre_feedforward_layernorm.weight", (h,), norm),
                    (p + "post_feedforward_layernorm.weight", (h,), norm)]
        if _sparse(config, i):
            out += _experts(config, p)
            continue
        if phi3:
            out.append((p + "mlp.gate_up_proj.weight", (2 * inter, h), "linear"))
        else:
            out += [(p + f"mlp.{proj}_proj.weight", (inter, h), "linear") for proj in ("gate", "up")]
        out.append((p + "mlp.down_proj.weight", (h, inter), "linear"))
    out.append(("model.norm.weight", (h,), norm))
    if not config.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h), "linear"))
    return out


def _sparse(config: dict, i: int) -> bool:
    """Whether layer i's MLP is a mixture of experts (as the HF decoder layer decides)."""
    if config["model_type"] == "mixtral":
        return True
    if config["model_type"] not in ("qwen2_moe", "qwen3_moe"):
        return False
    return i not in (config.get("mlp_only_layers") or ()) and (i + 1) % config.get("decoder_sparse_step", 1) == 0


def _experts(config: dict, p: str) -> list[tuple[str, tuple[int, ...], str]]:
    """The router and per-expert matrices of a sparse layer, named as hub checkpoints name them."""
    h = config["hidden_size"]
    if config["model_type"] == "mixtral":
        experts, inter, base, names = (config["num_local_experts"], config["intermediate_size"],
                                       p + "block_sparse_moe.", ("w1", "w3", "w2"))
    else:
        experts, inter, base, names = (config["num_experts"], config["moe_intermediate_size"], p + "mlp.",
                                       ("gate_proj", "up_proj", "down_proj"))
    out = [(base + "gate.weight", (experts, h), "linear")]
    for j in range(experts):
        e = f"{base}experts.{j}."
        out += [(e + f"{names[0]}.weight", (inter, h), "linear"), (e + f"{names[1]}.weight", (inter, h), "linear"),
                (e + f"{names[2]}.weight", (h, inter), "linear")]
    if config["model_type"] == "qwen2_moe":  # the shared expert and its gate
        shared = config["shared_expert_intermediate_size"]
        out += [(base + "shared_expert.gate_proj.weight", (shared, h), "linear"),
                (base + "shared_expert.up_proj.weight", (shared, h), "linear"),
                (base + "shared_expert.down_proj.weight", (h, shared), "linear"),
                (base + "shared_expert_gate.weight", (1, h), "linear")]
    return out


def make_tensor(spec: RandomModelSpec, name: str, shape: tuple[int, ...], kind: str,
                generator: str = "cpu") -> torch.Tensor:
    """One parameter, drawn directly in the spec's dtype by its own generator; returned on the CPU."""
    seed = int.from_bytes(hashlib.sha256(f"{spec.seed}:{name}".encode()).digest()[:8], "little") >> 1
    device = "cpu" if generator == "cpu" else "cuda"
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.empty(shape, dtype=getattr(torch, spec.dtype), device=device)
    # A norm's scale is 1 + N(0, norm_std) either way: stored so for most families, as the w of 1 + w for Gemma.
    mean, std = {"norm": (1.0, spec.norm_std), "offset_norm": (0.0, spec.norm_std),
                 "embed": (0.0, spec.std if spec.embed_std is None else spec.embed_std)}.get(kind, (0.0, spec.std))
    return t.normal_(mean, std, generator=gen).cpu()


def build_tokenizer() -> str:
    """A byte-level BPE with ChatML special tokens, trained on the built-in corpus (JSON string)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return tok.to_str()


def tokenizer_config(max_len: int) -> dict:
    return {"add_bos_token": False, "add_eos_token": False, "bos_token": SPECIAL_TOKENS[1],
            "eos_token": SPECIAL_TOKENS[2], "pad_token": SPECIAL_TOKENS[0], "unk_token": None,
            "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "model_max_length": max_len,
            "tokenizer_class": "PreTrainedTokenizerFast"}


def _shards(spec: RandomModelSpec) -> list[list[tuple[str, tuple[int, ...], str]]]:
    itemsize = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    shards: list[list] = [[]]
    size = 0
    for entry in parameter_shapes(spec.config):
        nbytes = math.prod(entry[1]) * itemsize
        if shards[-1] and size + nbytes > spec.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_random_model(spec: RandomModelSpec, dest: Path, log=None, generator: str | None = None) -> str:
    """Write ``spec`` as an HF directory at ``dest`` (atomically: temp dir, then rename); returns its sha256.

    ``generator`` defaults to ``spec.generator()``; the stamp records it with the recipe and the sha256.
    """
    generator = generator or spec.generator()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shards = _shards(spec)
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        if log:
            log(f"writing {len(shards)} shard(s) of {dest.name} (generator {generator})")
        hashes = _write_shards(spec, [tmp / n for n in names], shards, generator)
        dtype = getattr(torch, spec.dtype)
        if len(shards) > 1:
            total = sum(math.prod(shape) * dtype.itemsize for entries in shards for _, shape, _ in entries)
            weight_map = {n: fname for fname, entries in zip(names, shards) for n, _, _ in entries}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_bytes(_dump(index))
        (tmp / "config.json").write_bytes(_dump(spec.config))
        (tmp / "tokenizer.json").write_bytes(build_tokenizer().encode())
        (tmp / "tokenizer_config.json").write_bytes(
            _dump(tokenizer_config(spec.config.get("max_position_embeddings", 2048))))
        sha = hf.files_sha256(tmp, [p for p in tmp.iterdir()], known=hashes)
        stamp = {"recipe": spec.recipe(generator), "sha256": sha}
        if generator != "cpu":
            stamp["generator"] = generator
        (tmp / STAMP).write_bytes(_dump(stamp))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if read_stamp(dest).get("recipe") == stamp["recipe"]:
            shutil.rmtree(tmp)  # a concurrent writer finished the same model first; its readers keep it
        else:
            _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sha


def _write_shards(spec: RandomModelSpec, paths: list[Path], shards: list[list], generator: str) -> dict[Path, str]:
    """Write every shard, all at once, hashed as written; path -> sha256.

    Threads draw the tensors (torch releases the GIL while it fills them), a few per shard ahead of its writer,
    so the CPU's generator runs on every core and the GPU's copies overlap the writes.
    """
    dtype = getattr(torch, spec.dtype)
    kinds = {name: kind for entries in shards for name, _, kind in entries}
    shapes = {name: shape for entries in shards for name, shape, _ in entries}

    def make(name: str) -> torch.Tensor:
        return make_tensor(spec, name, shapes[name], kinds[name], generator)

    n = workers()
    ahead = max(1, n // len(shards))
    with ThreadPoolExecutor(n) as makers, ThreadPoolExecutor(min(len(shards), n)) as writers:
        jobs = [writers.submit(fileio.write_safetensors, path, [(name, dtype, shape) for name, shape, _ in entries],
                               make, {"format": "pt"}, makers, ahead) for path, entries in zip(paths, shards)]
        return {path: job.result() for path, job in zip(paths, jobs)}


def _replace_dir(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``, moving a stale ``dest`` aside first; a racing writer's copy is kept."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.rename(dest, old / "d")
    try:
        os.rename(new, dest)
    except OSError:
        if not dest.exists():
            raise
        shutil.rmtree(new, ignore_errors=True)  # another process finished the same model first
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_stamp(dest: Path) -> dict:
    try:
        return json.loads((Path(dest) / STAMP).read_text())
    except (OSError, ValueError):
        return {}

