"""The real server as a subprocess (``python -m runtime.cli serve``) on 127.0.0.1, over a tiny artifact.

The artifact is tiny-llama with max_batch 32, so 32 clients can share one decode step; it is built once per
test session (workers share it through the e2e file lock) in the session's temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import _build_once, _shared_root

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
SERVE_LIMITS = {"max_seq_len": 128, "max_batch": 32}
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """One unlabelled sample of /metrics by its full name."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_server(artifact: Path, log_path: Path, *args: str) -> Iterator[Server]:
    """Start ``runtime serve ARTIFACT --port FREE *args``; yield once /health answers; stop it afterwards."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", str(artifact), "--port", str(port),
                                 *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up in {START_TIMEOUT_S} s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory) -> Path:
    def make(out: Path) -> None:
        from compiler.build import build

        build("tiny-llama", out, targets=["cuda:90"], dtype="fp32", autotune=False, **SERVE_LIMITS)

    return _build_once(_shared_root(tmp_path_factory), "tiny-llama-serve", make)


@pytest.fixture(scope="module")
def server(serve_artifact, tmp_path_factory) -> Iterator[Server]:
    """The torch backend behind an API key."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with run_server(serve_artifact, log_path, "--backend", "torch", "--api-key", API_KEY,
                    "--served-model-name", "tiny-llama") as s:
        yield s


@pytest.fixture(scope="module")
def engine(serve_artifact):
    """The same artifact in this process: what the server's answers are compared with."""
    from runtime.engine import load

    return load(serve_artifact, backend="torch")
