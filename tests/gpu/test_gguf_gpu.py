"""GGUF tensors served natively (--quant gguf) on the GPU (Triton JIT): the repacked blocks of every native type
through linear / rms_norm_linear (GEMV, split-K, tensor-core GEMV and GEMM layouts, the heuristic's pick per token
count), the embedding and logits at model sizes; then the mixed-type GGUF of tests/gguf_synth.py compiled for this
GPU in bf16 and fp32 against HF transformers on the same file.

Written without a GPU at hand (CPU-tested through the interpreter only, tests/kernels/test_gguf_matmul.py): the first
run on a GPU is this file's first run. As in test_int4_matmul_gpu.py, a tensor-core variant rounds the dequantized
weight to the activation dtype before tl.dot, so it is compared with the reference on that rounded weight; the
broadcast GEMV keeps fp32 and is compared with the fp32 dequantization.
"""

import pytest
import torch

from compiler.frontends.gguf_blocks import NATIVE_TYPES, repack
from kernels import embedding, linear, logits, rms_norm_linear
from kernels.weight_quant import dequantize
from tests.gguf_synth import random_blocks

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
EPS = 1e-5
# (K, N): a 1.1B-class qkv and down projection (K multiples of 256, as the K types need)
SHAPES = [(2048, 2560), (5632, 2048)]
TOKENS = [1, 3, 16, 300]


def _weight(type_name, N, K, seed=0):
    _, w, scale = repack(type_name, random_blocks(type_name, N, K, seed=seed, small=True), N, K)
    return w.cuda(), scale.cuda()


def _rel(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("type_name", NATIVE_TYPES)
def test_gguf_linear_and_rms_norm_linear(type_name, K, N, T, dtype):
    w, scale = _weight(type_name, N, K)
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, K, generator=g, device="cuda").to(dtype)
    norm_w = (1 + 0.2 * torch.randn(K, generator=g, device="cuda")).to(dtype)
    meta = {"K": K, "N": N, "eps": EPS, "stride_x": K, "max_T": T, "max_S": 1, "T_bucket": T,
            "quant": "int4" if w.dtype == torch.uint8 else "int8_group", "group_size": K // scale.shape[1]}
    for module, kwargs in ((linear, {}), (rms_norm_linear, {"norm_w": norm_w, "eps": EPS})):
        config = module.default({**meta, "has_bias": False, "has_residual": False})
        fn = linear.linear if module is linear else rms_norm_linear.rms_norm_linear
        out = fn(x, w, scale=scale, **kwargs)
        dense = dequantize(w, scale)
        ref_w = dense.to(dtype) if config["USE_DOT"] else dense
        ref = module.reference(x, ref_w, **kwargs)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) <= TOL[dtype], (module.__name__, config)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q6_K", "Q4_K"])
@pytest.mark.parametrize("R", [1, 4, 32])
def test_gguf_tables(type_name, R):
    V, D = 49152, 576 if type_name == "Q8_0" else 768
    table, weight_scale = _weight(type_name, V, D, seed=R)
    g = torch.Generator(device="cuda").manual_seed(R)
    x = torch.randn(64, D, generator=g, device="cuda").to(torch.bfloat16)
    norm_w = (1 + 0.2 * torch.randn(D, generator=g, device="cuda")).to(torch.bfloat16)
    idx = torch.randint(0, 64, (R,), generator=g, device="cuda", dtype=torch.int32)
    out = logits.logits(x, norm_w, table, idx, eps=EPS, weight_scale=weight_scale)
    ref = logits.reference(x, norm_w, dequantize(table, weight_scale).to(torch.bfloat16), idx, eps=EPS)
    assert _rel(out, ref) <= TOL[torch.bfloat16]
    ids = torch.randint(0, V, (R,), generator=g, device="cuda", dtype=torch.int32)
    rows = embedding.embedding(ids, table, weight_scale=weight_scale, out_dtype="bf16")
    torch.testing.assert_close(rows, embedding.reference(ids, table, weight_scale, out_dtype="bf16"))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_mixed_gguf_artifact_matches_transformers(tmp_path, dtype, monkeypatch):
    from transformers import AutoModelForCausalLM

    from compiler.build import build, local_target
    from runtime.engine import load
    from tests.e2e.conftest import hf_logits, random_prompt
    from tests.gguf_synth import write_mixed_gguf

    path = write_mixed_gguf(tmp_path / "mixed.gguf")
    out = build(str(path), tmp_path / "art", targets=[str(local_target())], dtype=dtype, autotune=False,
                max_seq_len=256, max_batch=4).out
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    prompt = random_prompt(model.config.vocab_size, 40, seed=0)
    ref = hf_logits(model, prompt)
    monkeypatch.setenv("TRILITE_GGUF_ON_GPU", "1")  # the cuda backend refuses gguf artifacts until this passes
    engine = load(out, backend="auto")
    got = torch.as_tensor(engine.logits(prompt))  # numpy fp32 on the torch-free cuda path
    assert _rel(got, ref) <= (1e-4 if dtype == "fp32" else 3e-2)
