"""The torch-free GPU path on a GPU: `runtime run --backend cuda` loads neither torch nor triton, the weights land
on the device byte for byte, and the cuda backend (driver memory, copies, events, graphs) gives the torch backend's
logits and tokens, the device feed included.

The oracle is always the torch backend (each op's plain-torch reference, here on the same GPU), never the cuda
backend itself. fp32 on both sides: 1e-4 relative error leaves room for summation order only.

Run on the GPU machine: ``PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_lean_runtime_gpu.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
REL = 1e-4

# The CLI in a fresh interpreter; at exit it prints which of torch / triton were ever imported.
_RUN = """
import atexit, sys
atexit.register(lambda: print("LOADED", sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'triton'})))
from runtime.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def verified_artifact(tmp_path_factory):
    """A tiny fp32 Llama for this GPU with its reference logits (what `runtime verify` compares with)."""
    from compiler.build import build, local_target

    return build("tiny-llama", tmp_path_factory.mktemp("lean") / "tiny", targets=[str(local_target())], dtype="fp32",
                 max_seq_len=128, max_batch=4, autotune=False).out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("command", [["run", "--prompt", "hi", "--max-tokens", "4"], ["verify"],
                                     ["bench", "--pp", "32", "--tg", "8"]], ids=["run", "verify", "bench"])
def test_gpu_commands_import_neither_torch_nor_triton(verified_artifact, command):
    out = _cli(command[0], str(verified_artifact), "--backend", "cuda", *command[1:])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "LOADED []", out.stdout


def test_weights_reach_the_device_byte_for_byte(verified_artifact):
    """Every weight's device bytes equal its bytes in weights.safetensors (read with the safetensors package), at a
    16-byte-aligned address."""
    from safetensors.numpy import load_file

    import runtime
    from runtime.memory import DeviceArray

    engine = runtime.load(verified_artifact, backend="cuda", cuda_graphs=False)
    be = engine.backend
    want = {k: v for k, v in load_file(str(Path(verified_artifact) / "weights.safetensors")).items()}
    assert set(be.program.weights) <= set(want)
    for name, arr in be.program.weights.items():
        assert arr.ptr % 16 == 0, name
        got = be.memory.read(DeviceArray(arr.ptr, (arr.nbytes,), "u8"))
        assert got.tobytes() == np.ascontiguousarray(want[name]).tobytes(), name
    be.close()


def _pair(path):
    import runtime

    return (runtime.load(path, backend="cuda", max_blocks_total=32),
            runtime.load(path, backend="torch", device="cuda", max_blocks_total=32))


def test_engine_logits_are_numpy_fp32_and_match_the_torch_backend(verified_artifact):
    cuda, ref = _pair(verified_artifact)
    ids = list(range(7, 7 + 37))  # several max_batch chunks over a cached prefix
    got, want = cuda.logits(ids), ref.logits(ids)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
    assert type(got) is type(want) and got.dtype == want.dtype
    err = float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))
    assert err < REL, err


def test_greedy_tokens_equal_the_torch_backend_with_and_without_a_repetition_penalty(verified_artifact):
    """The asynchronous decode (graphs, the device feed, pinned readback) and the host-side penalty path (forward,
    numpy penalty, sampling kernel) against the torch backend's tokens."""
    from runtime.sampling import SamplingParams

    cuda, ref = _pair(verified_artifact)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300, 2], list(range(40, 73)), [17] * 20]
    for penalty in (1.0, 1.7):
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=penalty)
        got = [o.token_ids for o in cuda.generate(prompts, params)]
        assert got == [o.token_ids for o in ref.generate(prompts, params)], penalty


def test_a_feed_in_any_order_takes_the_right_sampled_rows(verified_artifact):
    """Backend.submit with a feed that swaps rows and leaves one to the host: the cuda backend's device-to-device
    copies against the base class's host gather (the torch backend), eager and through a graph."""
    from runtime.step import Chunk, make_step

    cuda, ref = (e.backend for e in _pair(verified_artifact))
    width = cuda.program.max_blocks
    greedy = {"temperature": np.zeros(3, np.float32), "top_k": np.zeros(3, np.int32),
              "top_p": np.ones(3, np.float32), "min_p": np.zeros(3, np.float32), "seeds": np.zeros(3, np.int64),
              "offsets": np.zeros(3, np.int64)}
    tables = [[1, 2], [3, 4], [5, 6]]
    prompts = [[11, 12, 13], [20, 21], [30, 31, 32, 33]]
    for graphs in (False, True):
        runs = []
        if graphs:
            cuda.capture_graphs()
        else:
            cuda._drop_graphs()  # eager: the copies then precede plain launches
        for b in (cuda, ref):
            first = b.submit(make_step("prefill", [Chunk(p, 0, t) for p, t in zip(prompts, tables)], 16, width),
                             greedy).tokens()
            # row 0 takes row 2's sample, row 1 keeps the host's id 99, row 2 takes row 0's
            step = make_step("decode", [Chunk([-1], 3, tables[0]), Chunk([99], 2, tables[1]),
                                        Chunk([-1], 4, tables[2])], 16, width)
            second = b.submit(step, greedy, np.array([2, -1, 0], np.int32)).tokens()
            # the batch kept its order: one run of three rows
            third = b.submit(make_step("decode", [Chunk([-1], 4, tables[0]), Chunk([-1], 3, tables[1]),
                                                  Chunk([-1], 5, tables[2])], 16, width),
                             greedy, np.array([0, 1, 2], np.int32)).tokens()
            runs.append((first, second, third))
        assert runs[0] == runs[1], (graphs, runs)
