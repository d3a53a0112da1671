"""Imports only go downward: kernels <- compiler; the runtime reads artifacts through artifact_format and never
imports the compiler, nor a private name of another package; artifact_format imports neither torch nor Triton.

Checked two ways: every import statement in the source (static, so a lazy import inside a function counts
too), and the modules a fresh interpreter has loaded after importing the runtime's entry points.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import COMPILE_EXTRA

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("artifact_format", "kernels", "compiler", "runtime")


def _imports(package: str):
    """(file, line, module, names) for every import in the package's source."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, node.lineno, alias.name, ()
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.lineno, node.module, tuple(a.name for a in node.names)


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p, line, mod, _ in _imports(package)
            if mod.split(".")[0] in forbidden]


def test_the_runtime_never_imports_the_compiler():
    assert not _offenders("runtime", ("compiler",))


def test_artifact_format_needs_no_torch_triton_or_pipeline_package():
    assert not _offenders("artifact_format", ("torch", "triton", "kernels", "compiler", "runtime"))


def test_kernels_import_no_compiler_or_runtime():
    assert not _offenders("kernels", ("compiler", "runtime"))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_of_another_package(package):
    bad = [f"{p.relative_to(ROOT)}:{line} takes {n} from {mod}" for p, line, mod, names in _imports(package)
           for n in names if n.startswith("_") and mod.split(".")[0] in PACKAGES and mod.split(".")[0] != package]
    assert not bad


def test_importing_the_runtime_loads_no_compiler_module():
    code = ("import sys, runtime, runtime.cli, runtime.engine, runtime.artifact, runtime.backends, runtime.verify; "
            "print(sorted(m for m in sys.modules if m == 'compiler' or m.startswith('compiler.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_gpu_serving_path_loads_nothing_of_the_compile_extra():
    """What `runtime inspect | run --backend cuda | serve | verify | bench` import before a backend is chosen: none of
    the compile extra's packages nor the kernel pack, so a plain `pip install .` serves artifacts on a GPU."""
    banned = (*COMPILE_EXTRA, "kernels", "compiler")
    code = ("import sys, runtime.cli, runtime.engine, runtime.serving.app, runtime.serving.server, runtime.verify, "
            "runtime.bench, runtime.artifact, runtime.backends.cuda, runtime.backends.hip; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {banned!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# What `runtime run ARTIFACT --backend cuda` loads on its way to the GPU: run in a fresh interpreter, it records the
# modules loaded when the process exits (after the CLI printed its error, or on a GPU after the run).
_RUN_CUDA = """
import atexit, sys
atexit.register(lambda: print("LOADED", sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'triton'})))
from runtime.cli import main
main(["run", sys.argv[1], "--backend", "cuda", "--prompt", "hi", "--max-tokens", "2"])
"""


def test_runtime_run_on_cuda_without_a_gpu_is_one_line_and_loads_no_torch_or_triton():
    """The whole GPU path up to the backend (cli, engine, artifact, tokenizer, runtime.backends.cuda's imports) on
    this GPU-less machine: the one-line "no GPU" error, and neither torch nor triton in sys.modules."""
    from runtime.device import cuda_target

    if cuda_target() is not None:
        pytest.skip("this machine has a GPU: tests/gpu/test_lean_runtime_gpu.py checks the run there")
    from tests.runtime.tiny_artifact import tiny_artifact

    out = subprocess.run([sys.executable, "-c", _RUN_CUDA, str(tiny_artifact())], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: backend cuda needs a CUDA GPU"), out.stderr
    assert out.stdout.strip().splitlines()[-1] == "LOADED []", out.stdout


def test_the_cuda_backend_modules_import_no_torch_or_triton():
    """Imported outright (not only reached through the CLI): the cuda/hip backends, their driver, device memory and
    weight upload, and everything the engine hands them (numpy host arrays)."""
    code = ("import sys, runtime.backends.cuda, runtime.backends.hip, runtime.device, runtime.weights_upload, "
            "runtime.program, runtime.pipeline, runtime.serving.scoring, runtime.bench, runtime.verify; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'triton'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
