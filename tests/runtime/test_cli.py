"""`runtime run | verify | inspect | bench` through click's CliRunner on a built tiny-llama, torch backend."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from artifact_format.layout import file_sha256 as sha256_file
from runtime.cli import main
from runtime.engine import load
from runtime.sampling import SamplingParams
from tests.runtime.tiny_artifact import copy_artifact, tiny_artifact

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def art():
    return tiny_artifact()


@pytest.fixture(scope="module")
def engine(art):
    return load(art, backend="torch")


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_run_streams_what_generate_gives(art, engine):
    res = _invoke("run", art, "--prompt", "The capital of France is", "--max-tokens", 9, "--backend", "torch")
    assert res.exit_code == 0, res.output
    expected = engine.generate(["The capital of France is"], SamplingParams(max_tokens=9, temperature=0))[0].text
    assert res.stdout == expected + "\n"


def test_run_chat_applies_the_template(art, engine):
    res = _invoke("run", art, "--chat", "--prompt", "Hi there", "--max-tokens", 6, "--backend", "torch",
                  "--temperature", 0.8, "--seed", 3, "--top-k", 40)
    assert res.exit_code == 0, res.output
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=True)
    sp = SamplingParams(max_tokens=6, temperature=0.8, seed=3, top_k=40)
    assert res.stdout == engine.generate([ids], sp)[0].text + "\n"


def test_run_refuses_too_many_tokens_in_one_line(art):
    res = _invoke("run", art, "--prompt", "hello", "--max-tokens", 500, "--backend", "torch")
    _one_line_error(res, "max_seq_len 128")


def test_verify_passes(art):
    res = _invoke("verify", art, "--backend", "torch")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == "PASS" and "relative error" in res.stdout


def test_verify_fails_on_wrong_reference(art, tmp_path):
    copy = copy_artifact(tmp_path / "art")
    ref = load_file(str(copy / "reference.safetensors"))
    ref["logits"] = ref["logits"] * 1.01
    save_file(ref, str(copy / "reference.safetensors"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["reference.safetensors"] = sha256_file(copy / "reference.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    res = _invoke("verify", copy, "--backend", "torch")
    assert res.exit_code == 1 and res.stdout.strip().splitlines()[-1] == "FAIL", res.output


def test_verify_damaged_artifact_is_one_line(art, tmp_path):
    copy = copy_artifact(tmp_path / "art")
    data = bytearray((copy / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "weights.safetensors").write_bytes(bytes(data))
    _one_line_error(_invoke("verify", copy, "--backend", "torch"), "weights.safetensors", "sha256")
    _one_line_error(_invoke("inspect", tmp_path / "missing"), "does not exist")


def test_inspect(art):
    res = _invoke("inspect", art)
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())  # the console wraps long lines at its width
    for needle in ("tiny-llama", "LlamaForCausalLM", "fp32", "attention ×2", "cuda:90", "max_seq_len 128"):
        assert needle in text, (needle, res.stdout)


def test_bench_prints_the_table(art):
    res = _invoke("bench", art, "--backend", "torch", "--pp", 16, "--tg", 4, "--batch", 1, "--batch", 2)
    assert res.exit_code == 0, res.output
    assert "pp16" in res.stdout and res.stdout.count("tg4") == 2


def test_no_prefix_cache_reaches_the_engine(art, monkeypatch):
    """run and bench load the engine with the flag's value, serve hands it to the server; on by default."""
    import runtime.bench
    import runtime.engine
    import runtime.serving.server

    seen = []
    real_load = runtime.engine.load

    def load(*args, **kw):
        seen.append(kw["prefix_cache"])
        return real_load(*args, **kw)

    monkeypatch.setattr(runtime.engine, "load", load)
    monkeypatch.setattr(runtime.serving.server, "serve", lambda *a, **kw: seen.append(kw["prefix_cache"]))
    monkeypatch.setattr(runtime.bench, "run_bench", lambda engine, **kw: [])  # its measuring is tested above
    run = ("run", art, "--prompt", "Hi", "--max-tokens", 2, "--backend", "torch")
    bench = ("bench", art, "--backend", "torch")
    for args in (run, bench, ("serve", art)):
        for flag in ((), ("--no-prefix-cache",)):
            res = _invoke(*args, *flag)
            assert res.exit_code == 0, res.output
    assert seen == [True, False] * 3


def test_mixed_step_options_reach_the_engine(art, monkeypatch):
    """--mixed-steps (the default) / --no-mixed-steps (run, serve) and --max-num-batched-tokens (run, serve,
    bench); a budget the artifact cannot take is one error line."""
    import runtime.bench
    import runtime.engine
    import runtime.serving.server

    seen = []
    real_load = runtime.engine.load

    def load(*args, **kw):
        seen.append((kw.get("mixed_steps", "load's default"), kw["max_num_batched_tokens"]))
        return real_load(*args, **kw)

    monkeypatch.setattr(runtime.engine, "load", load)
    monkeypatch.setattr(runtime.serving.server, "serve",
                        lambda *a, **kw: seen.append((kw["mixed_steps"], kw["max_num_batched_tokens"])))
    monkeypatch.setattr(runtime.bench, "run_bench", lambda engine, **kw: [])
    run = ("run", art, "--prompt", "Hi", "--max-tokens", 2, "--backend", "torch")
    for args in (run, ("serve", art)):
        assert _invoke(*args).exit_code == 0
        assert _invoke(*args, "--no-mixed-steps", "--max-num-batched-tokens", 8).exit_code == 0
    assert _invoke("bench", art, "--backend", "torch", "--max-num-batched-tokens", 8).exit_code == 0
    assert seen == [(True, None), (False, 8)] * 2 + [("load's default", 8)]
    _one_line_error(_invoke(*run, "--max-num-batched-tokens", 0), "--max-num-batched-tokens", "from 1 to", "128")


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and all(c in out.stdout for c in ("run", "verify", "inspect", "bench"))


def test_without_triton_the_cpu_backends_say_which_extra(art):
    """A runtime-only install (no Triton): inspect works; interpret and torch (and auto without a GPU) end in one
    line naming the compile extra, cuda in the one-line no-GPU error; none of them a traceback."""
    import torch

    cpu_only = not torch.cuda.is_available()  # with a GPU, auto and cuda run the artifact's cuda:90 kernels
    code = f"""
import json, sys
sys.modules["triton"] = None  # what `import triton` meets where it is not installed: ModuleNotFoundError
from click.testing import CliRunner
from runtime.cli import main
out = {{}}
for b in ("interpret", "torch", "auto", "cuda"):
    r = CliRunner().invoke(main, ["run", {str(art)!r}, "--prompt", "hi", "--backend", b])
    out[b] = [r.exit_code, r.stderr]
r = CliRunner().invoke(main, ["inspect", {str(art)!r}])
out["inspect"] = [r.exit_code, r.stdout]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for b in ("interpret", "torch", "auto")[:3 if cpu_only else 2]:
        rc, err = out[b]
        assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, (b, err)
        assert err.startswith(f"error: the {b if b != 'auto' else 'torch'} backend needs triton"), (b, err)
        assert "pip install 'trilite[compile]'" in err, (b, err)
    rc, err = out["cuda"]
    assert not cpu_only or rc == 1 and err.count("\n") == 1 and err.startswith("error: backend cuda needs a CUDA"), err
    assert out["inspect"][0] == 0 and "tiny-llama" in out["inspect"][1], out["inspect"]
