"""Programmatic dependent launch, checked in the compiled code (no GPU needed).

A kernel launched with PDL may start while the previous kernel still runs; it must not read anything before its
griddepcontrol.wait. Triton's passes can move loads across the wait's inline asm, so the only proof is the PTX
itself: for every candidate config of the ops built with USE_PDL (every kernel of a decode step), no global
memory access (loads, prefetches, async copies, stores, atomics) may come before the wait, and the trigger
(launch_dependents) must be there.
On sm_80 and AMD the instructions do not exist: those binaries are built without them.
"""

import re

import pytest

from compiler.aot import Target, compile_kernel, compile_launch, for_target
from kernels import (
    add_rms_norm,
    attention_decode,
    embedding,
    linear,
    logits,
    rms_norm,
    rms_norm_linear,
    rope,
    sampling,
)
from kernels.spec import PDL_TRIGGER, USE_PDL
from tests.kernels.test_attention_prefill import BLOCK_SIZE, attrs

# Global memory traffic of any kind: loads, prefetches, async copies, stores, atomics and reductions.
LOAD = re.compile(r"\b(ld\.global|prefetch|cp\.async|ld\.volatile|ld\.relaxed|ld\.acquire|st\.global|atom\.|red\.)")
SM90 = Target.parse("cuda:90")


def _ptx(launch, target: Target) -> str:
    return compile_kernel(launch, target).asm["ptx"]


def _cases():
    # TinyLlama's qkv heads for the rope epilogue, which loads positions and the rope table after the matmul.
    rope_attrs = {"act": "rope", "num_q_heads": 32, "num_kv_heads": 4, "head_dim": 64, "rotary_dim": 64,
                  "is_neox": True, "write_cache": True}
    for op, extra in ((linear, {"has_bias": True, "has_residual": True}),
                      (rms_norm_linear, {"has_bias": False, "eps": 1e-5, "act": "silu_mul"}),
                      (rms_norm_linear, {"has_bias": False, "eps": 1e-5, **rope_attrs})):
        for bucket in (1, 4, 16, 2048):
            meta = {"K": 2048, "N": 2560, "max_T": 2048, "max_S": 32, "T_bucket": bucket, **extra}
            for config in dict.fromkeys([*op.SPEC.configs(meta), op.SPEC.default(meta)]):
                name = f"{op.SPEC.name}-{extra.get('act')}-T{bucket}-{len(config.constexprs)}"
                yield pytest.param(op, meta, config, id=name)


def _assert_waits_first(launch) -> None:
    """Built for sm_90, the launch has USE_PDL on with the build's trigger (its plan has it off); its PTX makes no
    memory access before griddepcontrol.wait and triggers its dependents after it."""
    assert dict(launch.constexprs)[USE_PDL] is False, "plans build without PDL; the compiler turns it on per target"
    built = for_target(launch, SM90)
    assert dict(built.constexprs)[USE_PDL] == PDL_TRIGGER
    lines = _ptx(built, SM90).splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    early = [line.strip() for line in lines[:wait] if LOAD.search(line)]
    assert not early, f"{launch.kernel.fn.__name__}: memory accesses before griddepcontrol.wait: {early[:3]}"
    assert any("griddepcontrol.launch_dependents" in line for line in lines[wait:])


@pytest.mark.parametrize("op,meta,config", list(_cases()))
def test_no_load_before_gdc_wait(op, meta, config):
    dtypes = {"x": "bf16", "w": "bf16", "bias": "bf16", "residual": "bf16", "out": "bf16", "positions": "i32",
              "cos_sin": "fp32", "slot_mapping": "i32", "k_cache": "bf16", "v_cache": "bf16"}
    for launch in op.SPEC.plan(meta, dtypes, config).launches:  # with the norm's pre-pass at 2,048 rows
        _assert_waits_first(launch)


def _decode_kernels():
    """Every other kernel of a decode step built with USE_PDL, at a decode shape."""
    att = {**attrs(32, 4, 64), "block_size": BLOCK_SIZE, "max_blocks": 256, "max_T": 32, "max_S": 32, "T_bucket": 1}
    att_dt = {"qkv": "bf16", "k_cache": "bf16", "v_cache": "bf16", "seq_lens": "i32", "block_tables": "i32",
              "out": "bf16"}
    rope_meta = {"num_q_heads": 16, "num_kv_heads": 8, "head_dim": 128, "rotary_dim": 128, "is_neox": True,
                 "use_qk_norm": True, "eps": 1e-6, "write_cache": True, "max_pos": 4096, "max_blocks": 128,
                 "max_T": 64, "max_S": 8}
    rope_dt = {"qkv": "bf16", "positions": "i32", "cos_sin": "fp32", "slot_mapping": "i32", "k_cache": "bf16",
               "v_cache": "bf16", "q_norm": "bf16", "k_norm": "bf16"}
    sampling_dt = {"logits": "fp32", "temperature": "fp32", "top_k": "i32", "top_p": "fp32", "min_p": "fp32",
                   "seeds": "i64", "offsets": "i64", "out": "i32"}
    norm = {"D": 2048, "eps": 1e-5, "max_T": 64, "max_S": 8}
    yield "embedding", embedding, {"V": 32000, "D": 2048, "max_T": 64, "max_S": 8}, \
        {"ids": "i32", "weight": "bf16", "out": "bf16"}
    yield "attention_decode", attention_decode, att, att_dt
    yield "logits", logits, {"D": 2048, "V": 32000, "eps": 1e-5, "max_T": 64, "max_S": 8, "T_bucket": 1}, \
        {"x": "bf16", "norm_w": "bf16", "weight": "bf16", "last_idx": "i32", "out": "fp32"}
    yield "sampling", sampling, {"V": 32000, "max_T": 64, "max_S": 8}, sampling_dt
    yield "rope", rope, rope_meta, rope_dt
    yield "rms_norm", rms_norm, {**norm, "has_residual": True}, {r: "bf16" for r in ("x", "w", "residual", "out")}
    yield "add_rms_norm", add_rms_norm, norm, {r: "bf16" for r in ("x", "residual", "w", "out", "residual_out")}


@pytest.mark.parametrize("op,meta,dtypes", [pytest.param(*c[1:], id=c[0]) for c in _decode_kernels()])
def test_decode_kernels_wait_before_any_access(op, meta, dtypes):
    """Every launch of every candidate config (attention's combine kernel too): the wait first, then the trigger."""
    launches = [launch for config in dict.fromkeys([op.SPEC.default(meta), *op.SPEC.configs(meta)])
                for launch in op.SPEC.plan(meta, dtypes, config).launches]
    for launch in launches:
        _assert_waits_first(launch)


@pytest.mark.parametrize("target", ["cuda:80", "hip:gfx942"])
def test_targets_without_pdl_build_without_it(target):
    meta = {"K": 256, "N": 128, "max_T": 64, "max_S": 4, "T_bucket": 1, "has_bias": False, "has_residual": True}
    dtypes = {"x": "fp16", "w": "fp16", "residual": "fp16", "out": "fp16"}
    (launch,) = linear.SPEC.plan(meta, dtypes, linear.SPEC.default(meta)).launches
    t = Target.parse(target)
    built = for_target(launch, t)
    assert dict(built.constexprs)[USE_PDL] is False and not t.has_pdl
    compile_launch(built, t)  # no griddepcontrol on these targets: it must still compile
