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
