"""The GPU path must not import Triton or the kernel pack: a fresh interpreter imports the driver, the
Program and the cuda/hip backends, builds a Program and parameter arrays on the CPU, and checks sys.modules."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, torch
import runtime.driver, runtime.program, runtime.backends.cuda, runtime.backends.hip
from runtime.driver import ParamArray
from runtime.step import Chunk, make_step
from tests.runtime.test_program import _program

program = _program()
env = program.load_step(make_step("decode", [Chunk([3], 4, [1])], 16, 3), pad_to=2)
for launch in program.launches("decode", env):
    values = [p.value.data_ptr() if p.kind == "tensor" else env[p.value] if p.kind == "sym" else p.value
              for p in launch.params]
    params = ParamArray([p.type for p in launch.params], values)
    assert len(params) == len(values) + 2
    assert all(params.get(i) == v or abs(params.get(i) - v) < 1e-6 for i, v in enumerate(values))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("triton", "kernels")))
"""


def test_gpu_path_imports_neither_triton_nor_kernels():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
