import pytest
import torch

from kernels.linear import SPEC, linear, reference
from kernels.matmul_configs import gemm, gemv
from kernels.spec import alloc_scratch, run

# Every layout the configs can pick: GEMV with a broadcast product (1 and 4 rows per step, with and without
# split-K), GEMV on tl.dot (rows looped in blocks of 16, split-K with a K that no split divides), GEMM tiles
# with grouped ordering, and the heuristic default.
CONFIGS = {
    "gemv1": gemv(1, 16, 32, 1, False),
    "gemv4_split3": gemv(4, 32, 16, 3, False),
    "gemv_dot_split2": gemv(16, 32, 32, 2, True),
    "gemm": gemm(32, 16, 32, 4),
    "default": None,
}
SHAPES = [(1, 64, 48), (3, 100, 70), (37, 123, 130), (70, 96, 50)]
TOLERANCES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-3, 2e-3)]


# Shared memory a program may use (bytes): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB, MI300X (gfx942) 64 KB of LDS.
def assert_fits_shared_memory(spec, meta: dict, dtypes: dict) -> None:
    """The default's binaries load on every CI target (compiler/build.py falls back to it, after fewer stages, where a
    tuned config does not fit a cross-compiled target), and every candidate's on the largest, sm_90: a binary over
    the limit would compile and then fail at load time. Compiles hit Triton's cache after assert_cross_compiles."""
    from compiler.aot import Target, compile_launch
    from tests.kernels.aot_util import TARGETS

    sm90 = Target.parse("cuda:90")
    default = spec.default(meta)
    for config in dict.fromkeys([*spec.configs(meta), default]):
        for launch in spec.plan(meta, dtypes, config).launches:
            for target in TARGETS if config == default else [sm90]:
                shared = compile_launch(launch, target)[1]["shared"]
                assert shared <= target.max_shared, f"{config} on {target}: {shared} bytes of shared memory"


def _inputs(T, K, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, K, generator=g) / K**0.5).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    residual = torch.randn(T, N, generator=g).to(dtype)
    return x, w, bias, residual


def _poisoned(T, N, dtype):
    return torch.full((T, N), float("nan"), dtype=dtype)


# One row per step is the layout for T <= 4; many-row shapes only make that test slow in the interpreter.
CASES = [(name, *shape) for name in CONFIGS for shape in SHAPES if name != "gemv1" or shape[0] <= 16]


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("name,T,K,N", CASES)
def test_linear_bias_residual(name, T, K, N, dtype, atol, rtol):
    x, w, bias, residual = _inputs(T, K, N, dtype, seed=T * 7 + K * 13 + N)
    out = linear(x, w, bias, residual, out=_poisoned(T, N, dtype), config=CONFIGS[name])
    torch.testing.assert_close(out, reference(x, w, bias, residual), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("use_bias,use_residual", [(False, False), (True, False), (False, True)])
def test_linear_optional_inputs(name, use_bias, use_residual):
    T, K, N = 19, 75, 45
    x, w, bias, residual = _inputs(T, K, N, torch.float32, seed=5)
    bias, residual = (bias if use_bias else None), (residual if use_residual else None)
    out = linear(x, w, bias, residual, out=_poisoned(T, N, torch.float32), config=CONFIGS[name])
    torch.testing.assert_close(out, reference(x, w, bias, residual), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_residual_in_place(name):
    T, K, N = 21, 90, 66
    x, w, bias, residual = _inputs(T, K, N, torch.float16, seed=11)
    expected = reference(x, w, bias, residual)
    out = linear(x, w, bias, residual, out=residual, config=CONFIGS[name])
    assert out is residual
    torch.testing.assert_close(residual, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("name", ["gemv1", "gemv4_split3"])
def test_linear_bf16_without_dot(name):
    # tl.dot on bf16 is wrong in the interpreter; the broadcast-product GEMV is not, so bf16 is checked here.
    T, K, N = 6, 130, 40
    x, w, bias, residual = _inputs(T, K, N, torch.bfloat16, seed=3)
    out = linear(x, w, bias, residual, out=_poisoned(T, N, torch.bfloat16), config=CONFIGS[name])
    torch.testing.assert_close(out, reference(x, w, bias, residual), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["gemv4_split3", "gemm"])
def test_linear_row_strides(name):
    x_wide, w, bias, _ = _inputs(9, 150, 40, torch.float32, seed=8)
    x = x_wide[:, :110]
    w = w[:, :110].contiguous()
    out_wide = torch.full((9, 64), float("nan"))
    out = linear(x, w, bias, out=out_wide[:, :40], config=CONFIGS[name])
    torch.testing.assert_close(out, reference(x, w, bias), atol=1e-4, rtol=1e-4)
    assert out_wide[:, 40:].isnan().all(), "wrote outside its columns"


def test_configs_follow_token_bucket():
    meta = {"K": 2048, "N": 2048, "has_bias": False, "has_residual": True, "max_T": 4096, "max_S": 32}
    for bucket, loop_m, dot in ((1, True, False), (16, True, True), (4096, False, True)):
        config = SPEC.default({**meta, "T_bucket": bucket})
        assert (config["LOOP_M"], config["USE_DOT"]) == (loop_m, dot), (bucket, config)
        assert all(c["BLOCK_M"] <= 128 for c in SPEC.configs({**meta, "T_bucket": bucket}))
    one = SPEC.default({**meta, "T_bucket": 1})
    programs = -(-meta["N"] // one["BLOCK_N"]) * one["SPLIT_K"]
    assert programs >= 2 * 132, f"{one}: {programs} programs leave an H100's SMs idle at T=1"
    assert 1 in SPEC.tune_buckets and max(SPEC.tune_buckets) > 64


@pytest.mark.parametrize("name", ["gemv1", "gemv4_split3", "default"])
def test_token_bucket_one_takes_T_as_the_constant_1(name):
    """The bucket-1 variant (only ever run with one token) binds T to 1 at compile time, as Triton's JIT would
    specialise it; other buckets keep it a step symbol. The specialised launch still matches the reference."""
    K, N = 100, 70
    meta = {"K": K, "N": N, "has_bias": True, "has_residual": True, "max_T": 64, "max_S": 8}
    dtypes = {"x": "fp32", "w": "fp32", "bias": "fp32", "residual": "fp32", "out": "fp32"}
    config = CONFIGS[name] or SPEC.default({**meta, "T_bucket": 1})
    (one,) = SPEC.plan({**meta, "T_bucket": 1}, dtypes, config).launches
    (many,) = SPEC.plan({**meta, "T_bucket": 16}, dtypes, config).launches
    assert dict(one.constexprs)["T"] == 1 and "T" not in dict(one.args)
    assert dict(many.args)["T"] == ("sym", "T") and "T" not in dict(many.constexprs)
    x, w, bias, residual = _inputs(1, K, N, torch.float32, seed=5)
    out = _poisoned(1, N, torch.float32)
    plan = SPEC.plan({**meta, "T_bucket": 1}, dtypes, config)
    run(plan, {"x": x, "w": w, "bias": bias, "residual": residual, "out": out, **alloc_scratch(plan, "cpu")},
        {"T": 1, "S": 1})
    torch.testing.assert_close(out, reference(x, w, bias, residual), atol=1e-4, rtol=1e-4)


def test_split_k_is_one_launch_with_partials_and_semaphores():
    meta = {"K": 4096, "N": 1024, "has_bias": True, "has_residual": True, "max_T": 64, "max_S": 8, "T_bucket": 16}
    dtypes = {"x": "bf16", "w": "bf16", "bias": "bf16", "residual": "bf16", "out": "bf16"}
    plan = SPEC.plan(meta, dtypes, gemv(16, 64, 64, 4, True))
    assert [launch.name for launch in plan.launches] == ["_linear_kernel"]
    assert dict(plan.scratch) == {"partial": (4 * 16 * 1024, "fp32"), "semaphores": (1024 // 64, "i32")}
    assert SPEC.plan(meta, dtypes, gemv(16, 64, 64, 1, True)).scratch == ()


def test_split_k_leaves_semaphores_zero():
    """The semaphores are shared by every split-K launch of a step: each launch must leave them as it found them,
    and a second launch on the same buffers must give the same output."""
    T, K, N = 3, 96, 40
    x, w, bias, residual = _inputs(T, K, N, torch.float32, seed=21)
    config = gemv(4, 8, 16, 3, False)
    plan = SPEC.plan({"K": K, "N": N, "has_bias": True, "has_residual": False, "max_T": T, "max_S": 1,
                      "T_bucket": T}, {"x": "fp32", "w": "fp32", "bias": "fp32", "out": "fp32"}, config)
    scratch = alloc_scratch(plan, x.device)
    outs = []
    for _ in range(2):
        out = _poisoned(T, N, torch.float32)
        run(plan, {"x": x, "w": w, "bias": bias, "out": out, **scratch}, {"T": T, "S": 1})
        assert scratch["semaphores"].eq(0).all()
        outs.append(out)
    torch.testing.assert_close(outs[0], reference(x, w, bias), atol=1e-4, rtol=1e-4)
    assert torch.equal(outs[0], outs[1])


# Every bucket's candidates in fp16; bf16 at both ends; fp32 (ieee dot, halved stages) for the GEMM tiles.
COMPILE_CASES = [("fp16", b) for b in (1, 16, 64, 2048)] + [("bf16", 1), ("bf16", 2048), ("fp32", 2048)]


@pytest.mark.parametrize("dtype,bucket", COMPILE_CASES)
def test_linear_cross_compiles(dtype, bucket):
    from tests.kernels.aot_util import assert_cross_compiles

    meta = {"K": 2048, "N": 5632, "has_bias": True, "has_residual": True, "max_T": 2048, "max_S": 32,
            "T_bucket": bucket}
    dtypes = {"x": dtype, "w": dtype, "bias": dtype, "residual": dtype, "out": dtype}
    assert assert_cross_compiles(SPEC, meta, dtypes) >= 3
    assert_fits_shared_memory(SPEC, meta, dtypes)
