"""Cross-compilation check shared by the kernel tests: every config a spec can choose yields a binary."""

from compiler.aot import Target, compile_launch
from kernels.spec import KernelSpec

TARGETS = [Target.parse(t) for t in ("cuda:80", "cuda:90", "hip:gfx942")]


def assert_cross_compiles(spec: KernelSpec, meta: dict, dtypes: dict) -> int:
    """Compile every launch of every candidate config (and the default) for the three CI targets."""
    configs = list(dict.fromkeys([*spec.configs(meta), spec.default(meta)]))
    count = 0
    for config in configs:
        for launch in spec.plan(meta, dtypes, config).launches:
            for target in TARGETS:
                binary, md = compile_launch(launch, target)
                assert len(binary) > 1000, f"{spec.name} {config} {target}: empty binary"
                assert md["name"] == launch.name
                count += 1
    return count
