"""Hostile but fair input to `runtime run | inspect` (issue 9): each case ends in one `error: ...` line.

Damage is made consistent where it matters (the manifest's sha256 rewritten), so each test reaches the check
it is about instead of stopping at the hash check; the tiny-llama artifact is shared and every test damages a copy.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from runtime.cli import main
from tests.runtime.hostile import edit_json, invoke, one_line_error, rehash, tree
from tests.runtime.tiny_artifact import copy_artifact, tiny_artifact

ROOT = Path(__file__).resolve().parents[2]
RUN = ("--max-tokens", "3", "--backend", "torch")


@pytest.fixture
def art(tmp_path):
    return copy_artifact(tmp_path / "art")


def _run(art, *args, prompt="Hello", **kw):
    return invoke(main, "run", art, "--prompt", prompt, *RUN, *args, **kw)


def test_unlisted_files_beside_the_tokenizer_are_never_read(art):
    before = _run(art, "--chat")
    assert before.exit_code == 0, before.output
    (art / "chat_template.jinja").write_text("HIJACKED {{ messages[0]['content'] }}")
    (art / "generation_config.json").write_text(json.dumps({"eos_token_id": list(range(384))}))
    after = _run(art, "--chat")
    assert after.exit_code == 0 and after.stdout == before.stdout, after.output
    from runtime.engine import load

    tok = load(art, backend="torch").tokenizer
    assert "HIJACKED" not in tok.get_chat_template() and len(tok.eos_token_ids) == 1


def test_a_link_out_of_the_artifact_is_refused(art, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_bytes((art / "tokenizer.json").read_bytes())  # same bytes: the hash alone would pass it
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(outside)
    one_line_error(_run(art), "tokenizer.json", "leads out of the artifact")
    one_line_error(invoke(main, "inspect", art), "leads out of the artifact")


@pytest.mark.parametrize("damage,needle", [
    (lambda w, n: w.__setitem__(n, w[n][:-1].contiguous()), "of shape"),
    (lambda w, n: w.__setitem__(n, w[n].half()), "as F16"),
    (lambda w, n: w.pop(n), "lacks tensor"),
    (lambda w, n: w.__setitem__("extra.weight", w[n].clone()), "extra.weight"),
], ids=["shape", "dtype", "missing", "unknown"])
def test_weights_are_checked_against_the_graph(art, damage, needle):
    weights = load_file(str(art / "weights.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    damage(weights, name)
    save_file(weights, str(art / "weights.safetensors"))
    rehash(art, "weights.safetensors")
    line = one_line_error(_run(art), "weights.safetensors", needle)
    assert name in line or "extra.weight" in line


def test_a_tokenizer_bigger_than_the_vocabulary_is_refused(art):
    def grow(tok):  # a vocabulary entry past the model's 384 embedding rows (added tokens get renumbered)
        tok["model"]["vocab"]["<|beyond|>"] = 5000
    edit_json(art, "tokenizer.json", grow)
    one_line_error(_run(art), "token ids up to 5000", "384 embedding rows")


def test_interpret_imports_only_the_kernel_pack(art, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "trilite_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n_k = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rel = "kernels/cuda-90/index.json"
    edit_json(art, rel, lambda index: next(iter(index["binaries"].values())).update(module="trilite_evil",
                                                                                      kernel="_k"))
    one_line_error(invoke(main, "run", art, "--prompt", "Hi", "--max-tokens", 1, "--backend", "interpret"),
                   "trilite_evil", "not in the kernel pack")
    assert not marker.exists() and "trilite_evil" not in sys.modules


def _declare_header(path: Path, n: int) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = n.to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("n", [2**62, 12, 1], ids=["huge", "cut-json", "tiny"])
def test_malformed_safetensors_header(art, n):
    _declare_header(art / "weights.safetensors", n)
    rehash(art, "weights.safetensors")
    one_line_error(_run(art), "weights.safetensors", "not a valid safetensors file")
    one_line_error(invoke(main, "inspect", art), "not a valid safetensors file")


@pytest.mark.parametrize("template,needle", [
    ("{{ raise_exception('no system prompts here') }}", "no system prompts here"),
    ("{{ messages.append({'role': 'system'}) }}", "SecurityError"),
    ("{% for %}", "TemplateSyntaxError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
], ids=["raises", "sandbox", "syntax", "crash"])
def test_failing_chat_template(art, template, needle):
    edit_json(art, "tokenizer_config.json", lambda c: c.__setitem__("chat_template", template))
    one_line_error(_run(art, "--chat"), "chat template failed", needle, "run without --chat")
    assert _run(art).exit_code == 0  # a plain prompt still runs


def test_a_prompt_that_is_not_utf8(art):
    # Through a real process: Python hands the shell's bytes to the program as lone surrogates.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(art), "--prompt", b"caf\xe9 \xff",
                           *RUN], capture_output=True, env=env, cwd=ROOT, timeout=120)
    stderr = proc.stderr.decode(errors="replace").strip().splitlines()
    assert proc.returncode == 1 and len(stderr) == 1, proc.stderr
    assert stderr[0].startswith("error: the prompt (or a --stop string) is not valid UTF-8")


@pytest.mark.parametrize("gb", ["inf", "nan", "-1", "1e9"])
def test_kv_cache_size_out_of_range(art, gb):
    one_line_error(_run(art, "--kv-cache-gb", gb), "--kv-cache-gb")


def test_debug_shows_the_traceback(art):
    plain = _run(art, "--kv-cache-gb", "inf")
    one_line_error(plain)
    debug = invoke(main, "--debug", "run", art, "--prompt", "Hello", *RUN, "--kv-cache-gb", "inf")
    assert debug.exit_code == 1 and isinstance(debug.exception, ValueError)  # raised, so click shows it
    by_env = _run(art, "--kv-cache-gb", "inf", env={"TRILITE_DEBUG": "1"})
    assert isinstance(by_env.exception, ValueError)


def test_usage_errors_are_one_line_too(art):
    one_line_error(invoke(main, "run", art), "--prompt")
    one_line_error(invoke(main, "run", art, "--prompt", "x", "--backend", "fpga"), "fpga")


def test_nothing_outside_the_artifact_changes(art, tmp_path):
    _declare_header(art / "weights.safetensors", 2**62)
    rehash(art, "weights.safetensors")
    before = tree(tmp_path)
    one_line_error(_run(art))
    assert tree(tmp_path) == before
    tiny_artifact()  # the shared artifact still exists and is intact
