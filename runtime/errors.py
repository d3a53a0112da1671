"""Errors the runtime reports to a user as one line (the CLI prints them without a traceback)."""

from __future__ import annotations


class ArtifactError(Exception):
    """An artifact that cannot be used as it is; the message is one sentence that says what to do."""
