"""``runtime serve``'s body: load the artifact, build the app, run it under uvicorn until interrupted."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("trilite.serve")


def setup_logging() -> None:
    """The server's lines to stderr (one per request); uvicorn's own access log stays off to keep it one."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          backend: str = "auto", kv_cache_gb: float | None = None, max_queue: int = 256,
          served_model_name: str | None = None, async_decode: bool = True, prefix_cache: bool = True,
          mixed_steps: bool = True, max_num_batched_tokens: int | None = None) -> None:
    """async_decode: see ``runtime.engine.Engine`` (False reads every step's ids before the next is scheduled);
    prefix_cache: reuse the KV blocks of prompts' cached prefixes; mixed_steps, max_num_batched_tokens: decode
    tokens and prompt chunks in one step, up to that many tokens (all ``runtime.engine.Engine``)."""
    import uvicorn

    from runtime.engine import load
    from runtime.serving.app import create_app

    if max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
    setup_logging()
    engine = load(artifact, backend=backend, kv_cache_gb=kv_cache_gb, async_decode=async_decode,
                  prefix_cache=prefix_cache, mixed_steps=mixed_steps, max_num_batched_tokens=max_num_batched_tokens)
    name = served_model_name or Path(artifact).resolve().name
    app = create_app(engine, name, api_key=api_key, max_queue=max_queue)
    log.info("serving %s at http://%s:%d on the %s backend: %d KV blocks of %d tokens, max_batch %d, %s decode, "
             "%s steps of up to %d tokens", name, host, port, engine.backend.name, engine.allocator.num_blocks,
             engine.limits.block_size, engine.limits.max_batch, "asynchronous" if async_decode else "synchronous",
             "mixed" if mixed_steps else "prefill or decode", engine.scheduler.max_num_tokens)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
