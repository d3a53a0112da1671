"""The driver launch convention on a real GPU, before any artifact: kernels of the pack compiled here with
compiler.aot, loaded through runtime.driver, launched with prebuilt parameter arrays, captured in CUDA graphs;
then the cuda backend on a small hand-made artifact (embedding -> rms_norm -> logits, plus sampling).

Run on the GPU machine: ``PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_driver_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _target():
    from compiler.build import local_target

    return local_target()


def _bind(launch, tensors: dict, env: dict) -> tuple[list[str], list]:
    types, values = [], []
    sig = dict(launch.signature)
    for name, (kind, val) in launch.args:
        types.append(sig[name])
        values.append(tensors[val].data_ptr() if kind == "tensor" else env[val] if kind == "sym" else val)
    return types, values


def _run_plan(driver, plan, tensors: dict, env: dict) -> list:
    """Compile and launch every launch of ``plan`` through the driver; returns (kernel, params, grid) per launch."""
    from artifact_format.kernel_index import eval_grid
    from compiler.aot import compile_launch
    from kernels.spec import DTYPE_NAMES
    from runtime.driver import ParamArray

    some = next(iter(tensors.values()))
    tensors = dict(tensors)
    for role, (numel, dt) in plan.scratch:
        tensors.setdefault(role, torch.empty(numel, dtype=DTYPE_NAMES[dt], device=some.device))
    out = []
    for launch in plan.launches:
        binary, md = compile_launch(launch, _target())
        assert md["global_scratch_size"] == 0 and md["profile_scratch_size"] == 0
        kernel = driver.load(binary, md["name"], md["num_warps"], md["shared"], md["warp_size"])
        params = ParamArray(*_bind(launch, tensors, env))
        grid = tuple(eval_grid(launch.grid, env)) + (1,) * (3 - len(launch.grid))
        driver.launch(kernel, grid, params, torch.cuda.current_stream().cuda_stream)
        out.append((kernel, params, grid, md))
    return out


@pytest.fixture(scope="module")
def driver():
    from runtime.driver import Driver

    torch.empty(1, device="cuda")  # torch creates the primary context the driver launches in
    return Driver()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("T,D", [(1, 64), (5, 123), (37, 576)])
def test_rms_norm_through_the_driver(driver, T, D, dtype, tol):
    from kernels.rms_norm import default, plan, reference

    g = torch.Generator(device="cuda").manual_seed(T * 100 + D)
    x = torch.randn(T, D, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(dtype)
    out = torch.full_like(x, float("nan"))
    meta = {"D": D, "eps": 1e-6, "max_T": T, "max_S": 1}
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    dt = {"x": name, "w": name, "out": name}
    _run_plan(driver, plan(meta, dt, default(meta)), {"x": x, "w": w, "out": out}, {"T": T, "S": 1, "R": 1})
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), reference(x, w, 1e-6).float(), atol=tol, rtol=tol)


def test_launch_errors_carry_the_driver_error_name(driver):
    from kernels.rms_norm import default, plan
    from runtime.driver import DriverError

    x = torch.randn(4, 64, device="cuda")
    meta = {"D": 64, "eps": 1e-6, "max_T": 4, "max_S": 1}
    ((kernel, params, _, _),) = _run_plan(driver, plan(meta, dict.fromkeys(("x", "w", "out"), "fp32"), default(meta)),
                                          {"x": x, "w": x[0], "out": x}, {"T": 4, "S": 1, "R": 1})
    with pytest.raises(DriverError, match="CUDA_ERROR_INVALID_VALUE"):
        driver.launch(kernel, (0, 1, 1), params, torch.cuda.current_stream().cuda_stream)
    with pytest.raises(DriverError, match="cuModuleLoadData"):
        driver.load(b"\x7fELF not a cubin" * 8, "k", 4, 0)


def test_large_shared_memory_kernel(driver):
    """A prefill GEMM tile asking for more than 48 KB of shared memory needs the dynamic-size opt-in."""
    from kernels.linear import plan, reference
    from kernels.matmul_configs import gemm

    T, K, N = 300, 512, 384
    config = gemm(128, 128, 64, 8)
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(T, K, device="cuda", generator=g).half()
    w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).half()
    out = torch.full((T, N), float("nan"), device="cuda", dtype=torch.half)
    meta = {"K": K, "N": N, "has_bias": False, "has_residual": False, "max_T": T, "max_S": 1, "T_bucket": T}
    launched = _run_plan(driver, plan(meta, dict.fromkeys(("x", "w", "out"), "fp16"), config),
                         {"x": x, "w": w, "out": out}, {"T": T, "S": 1, "R": 1})
    torch.cuda.synchronize()
    print("shared bytes per launch:", [md["shared"] for *_, md in launched])
    assert max(md["shared"] for *_, md in launched) > 48 * 1024, "pick a tile that needs the opt-in"
    torch.testing.assert_close(out.float(), reference(x, w).float(), atol=2e-2, rtol=2e-2)


def test_launches_captured_in_a_cuda_graph_replay_on_new_inputs(driver):
    """Static buffers + parameter arrays captured once: replays read whatever the buffers hold now."""
    from kernels import rms_norm, silu_mul

    T, D = 9, 96
    x = torch.randn(T, D, device="cuda")
    w = torch.randn(D, device="cuda")
    y = torch.empty(T, D, device="cuda")
    out = torch.full((T, D // 2), float("nan"), device="cuda")
    env = {"T": T, "S": 1, "R": 1}
    f32 = lambda *roles: dict.fromkeys(roles, "fp32")
    m1 = {"D": D, "eps": 1e-5, "max_T": T, "max_S": 1}
    m2 = {"I": D // 2, "max_T": T, "max_S": 1}
    sites = _run_plan(driver, rms_norm.plan(m1, f32("x", "w", "out"), rms_norm.default(m1)),
                      {"x": x, "w": w, "out": y}, env)
    sites += _run_plan(driver, silu_mul.plan(m2, f32("x", "out"), silu_mul.default(m2)), {"x": y, "out": out}, env)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for kernel, params, grid, _ in sites:
            driver.launch(kernel, grid, params, torch.cuda.current_stream().cuda_stream)

    def expected():
        h = rms_norm.reference(x, w, 1e-5)
        return silu_mul.reference(h)

    for seed in range(3):
        x.copy_(torch.randn(T, D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected(), atol=1e-5, rtol=1e-5)


def launch_overhead_us(n: int = 5000) -> float:
    """Host µs per driver launch of a one-program kernel, scalar rewrite included (printed, never asserted)."""
    import time

    from kernels import silu_mul
    from runtime.driver import Driver

    torch.empty(1, device="cuda")
    driver = Driver()
    x, out = torch.randn(1, 64, device="cuda"), torch.empty(1, 32, device="cuda")
    meta = {"I": 32, "max_T": 1, "max_S": 1}
    ((kernel, params, grid, _),) = _run_plan(driver, silu_mul.plan(meta, {"x": "fp32", "out": "fp32"},
                                                                   silu_mul.default(meta)),
                                             {"x": x, "out": out}, {"T": 1, "S": 1, "R": 1})
    stream = torch.cuda.current_stream().cuda_stream
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        params.set(2, 1)  # the per-step scalar rewrite the backend does
        driver.launch(kernel, grid, params, stream)
    per_launch = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return per_launch


if __name__ == "__main__":
    print(f"driver launch from Python: {launch_overhead_us():.2f} µs per launch")
