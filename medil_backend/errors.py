"""User-facing errors.

Every mistake a user can make (a bad file, a bad option, a grid too large) raises
:class:`MedILError` with a one-line message that names the problem and the fix. Frontends
print the message and exit non-zero; they never show a traceback for these.
"""

from __future__ import annotations


class MedILError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message."""


class Cancelled(MedILError):
    """The operation was cancelled through its cancel token."""

    def __init__(self, message: str = "cancelled by the user; no output was written") -> None:
        super().__init__(message)
