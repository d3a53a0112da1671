"""Programmatic dependent launch, checked in the compiled code (no GPU needed).

A kernel launched with PDL may start while the previous kernel still runs; it must not read anything before its
griddepcontrol.wait. Triton's passes can move loads across the wait's inline asm, so the only proof is the PTX
itself: for every candidate config of the ops built with USE_PDL, no global memory access (loads, async
copies, stores, atomics) may come before the wait, and the trigger (launch_dependents) must be there. On sm_80
and AMD the instructions do not exist: those binaries are built without them.
"""

import re

import pytest

from compiler.aot import Target, compile_kernel, compile_launch, for_target
from kernels import linear, rms_norm_linear
from kernels.spec import PDL_TRIGGER, USE_PDL

# Global memory traffic of any kind: loads, async copies, stores, atomics and reductions.
LOAD = re.compile(r"\b(ld\.global|cp\.async|ld\.volatile|ld\.relaxed|ld\.acquire|st\.global|atom\.|red\.)")
SM90 = Target.parse("cuda:90")


def _ptx(launch, target: Target) -> str:
    return compile_kernel(launch, target).asm["ptx"]


def _cases():
    # TinyLlama's qkv heads for the rope epilogue, which loads positions and the rope table after the matmul.
    rope = {"act": "rope", "num_q_heads": 32, "num_kv_heads": 4, "head_dim": 64, "rotary_dim": 64, "is_neox": True,
            "write_cache": True}
    for op, extra in ((linear, {"has_bias": True, "has_residual": True}),
                      (rms_norm_linear, {"has_bias": False, "eps": 1e-5, "act": "silu_mul"}),
                      (rms_norm_linear, {"has_bias": False, "eps": 1e-5, **rope})):
        for bucket in (1, 4, 16, 2048):
            meta = {"K": 2048, "N": 2560, "max_T": 2048, "max_S": 32, "T_bucket": bucket, **extra}
            for config in dict.fromkeys([*op.SPEC.configs(meta), op.SPEC.default(meta)]):
                name = f"{op.SPEC.name}-{extra.get('act')}-T{bucket}-{len(config.constexprs)}"
                yield pytest.param(op, meta, config, id=name)


@pytest.mark.parametrize("op,meta,config", list(_cases()))
def test_no_load_before_gdc_wait(op, meta, config):
    dtypes = {"x": "bf16", "w": "bf16", "bias": "bf16", "residual": "bf16", "out": "bf16", "positions": "i32",
              "cos_sin": "fp32", "slot_mapping": "i32", "k_cache": "bf16", "v_cache": "bf16"}
    (launch,) = op.SPEC.plan(meta, dtypes, config).launches
    assert dict(launch.constexprs)[USE_PDL] is False, "plans build without PDL; the compiler turns it on per target"
    built = for_target(launch, SM90)
    assert dict(built.constexprs)[USE_PDL] == PDL_TRIGGER
    lines = _ptx(built, SM90).splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    early = [line.strip() for line in lines[:wait] if LOAD.search(line)]
    assert not early, f"{config}: memory accesses before griddepcontrol.wait: {early[:3]}"
    assert any("griddepcontrol.launch_dependents" in line for line in lines[wait:])


@pytest.mark.parametrize("target", ["cuda:80", "hip:gfx942"])
def test_targets_without_pdl_build_without_it(target):
    meta = {"K": 256, "N": 128, "max_T": 64, "max_S": 4, "T_bucket": 1, "has_bias": False, "has_residual": True}
    dtypes = {"x": "fp16", "w": "fp16", "residual": "fp16", "out": "fp16"}
    (launch,) = linear.SPEC.plan(meta, dtypes, linear.SPEC.default(meta)).launches
    t = Target.parse(target)
    built = for_target(launch, t)
    assert dict(built.constexprs)[USE_PDL] is False and not t.has_pdl
    compile_launch(built, t)  # no griddepcontrol on these targets: it must still compile
