"""One line per failure for the ``runtime`` and ``compiler`` CLIs: ``error: <what to do>`` and a non-zero exit.

Every exception a command meets ends here. Errors that already say what to do (ArtifactError, ValueError and
the compiler's SourceError, which is one) print as they are; an OS error prints its reason and file; anything
else is a bug and says so. ``--debug`` (before the command) or TRILITE_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from runtime.errors import ArtifactError, MissingExtra, missing_extra

DEBUG_ENV = "TRILITE_DEBUG"


def debugging(ctx: click.Context | None = None) -> bool:
    """Whether tracebacks are wanted: TRILITE_DEBUG=1 or the group's --debug flag."""
    root = ctx.find_root() if ctx is not None else None
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or bool(root and root.params.get("debug"))


def one_line(e: BaseException) -> str:
    """The sentence a user sees for ``e``."""
    if isinstance(e, ImportError) and not isinstance(e, MissingExtra):
        e = missing_extra(e, "this command") or e  # e.g. `compiler compile` in a runtime-only install
    if isinstance(e, (ArtifactError, ValueError, MissingExtra)) and str(e).strip():
        return str(e).strip().splitlines()[0]
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or e}{where}: check the path and its permissions"
    if isinstance(e, MemoryError):
        return "out of memory: give a smaller --kv-cache-gb or max-tokens, or use a machine with more memory"
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return (f"unexpected {type(e).__name__}{': ' + detail if detail else ''}; rerun with --debug (or "
            f"{DEBUG_ENV}=1) for the traceback and report it")


debug_option = click.option("--debug", is_flag=True, help=f"show tracebacks (also: {DEBUG_ENV}=1)")


class OneLineGroup(click.Group):
    """A click group whose every failure is one ``error: ...`` line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            if debugging(ctx):
                raise
            raise click.ClickException(one_line(e)) from None

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            message = e.format_message().strip().splitlines()[0] if e.format_message().strip() else "failed"
            hint = " (see --help)" if isinstance(e, click.UsageError) else ""
            click.echo(f"error: {message}{hint}", err=True)
            sys.exit(e.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)
