"""Progress bars for long compile phases (rich), silent when disabled (tests, non-interactive use)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as _Rich


class Progress:
    def __init__(self, enabled: bool = True):
        self._rich = _Rich(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=Console(stderr=True)) if enabled else None

    def __enter__(self) -> Progress:
        if self._rich:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich:
            self._rich.__exit__(*exc)

    def add(self, description: str, total: int) -> int | None:
        return self._rich.add_task(description, total=total) if self._rich else None

    def advance(self, task: int | None, n: int = 1) -> None:
        if self._rich and task is not None:
            self._rich.advance(task, n)
