"""Errors the runtime reports to a user as one line (the CLI prints them without a traceback)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# What only ``pip install 'trilite[compile]'`` brings: the compiler's packages and those the kernel pack (kernels/,
# which the interpret and torch backends run) imports, torch among them. A plain install serves artifacts on a GPU
# (the cuda backend) without any of them.
COMPILE_EXTRA = ("torch", "triton", "transformers", "gguf", "accelerate")
INSTALL_COMPILE = "pip install 'trilite[compile]'"


class ArtifactError(Exception):
    """An artifact that cannot be used as it is; the message is one sentence that says what to do."""


class MissingExtra(ImportError):
    """A module of the compile extra is not installed; the message says what needed it and how to install it."""


def missing_extra(e: ImportError, what: str) -> MissingExtra | None:
    """``e`` as a MissingExtra when it is a module of COMPILE_EXTRA that is missing (else None): ``what`` needs it."""
    root = (getattr(e, "name", None) or "").split(".")[0]
    if not isinstance(e, ModuleNotFoundError) or root not in COMPILE_EXTRA:
        return None
    return MissingExtra(f"{what} needs {root}, which is not installed (a runtime-only install leaves it out): "
                        f"{INSTALL_COMPILE}", name=root)


@contextmanager
def needs_compile_extra(what: str) -> Iterator[None]:
    """Turn a missing COMPILE_EXTRA module met inside the block into MissingExtra ("``what`` needs triton ...")."""
    try:
        yield
    except ImportError as e:
        if (missing := missing_extra(e, what)) is not None:
            raise missing from None
        raise
