"""trilite runtime: load a compiled artifact and serve it.

    engine = runtime.load("artifacts/smollm2-135m", backend="auto")
    outs = engine.generate(["The capital of France is"], runtime.SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids

The names below resolve on first use, so importing a submodule (runtime.driver, runtime.artifact)
does not pull in the engine, the tokenizer or the backends.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"load": "runtime.engine", "Engine": "runtime.engine", "RequestOutput": "runtime.engine",
            "SamplingParams": "runtime.sampling"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
