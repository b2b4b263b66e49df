"""User-facing errors.

Every mistake a user can make (a bad file, a bad option, a grid too large) raises
:class:`MedILError` with a one-line message that names the problem and the fix. Frontends
print the message and exit non-zero; they never show a traceback for these.
"""

from __future__ import annotations


class MedILError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message, in the user's words, not a frontend's.

    ``options`` names the settings that fix it (``max_memory``, ``spacing``, ``overwrite``, ...);
    each frontend adds its own spelling (the CLI: ``--max-memory``; the Slicer panel: its fields).
    """

    def __init__(self, message: str, *, options: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(message)
        self.options = tuple(options)


class Cancelled(MedILError):
    """The operation was cancelled through its cancel token."""

    def __init__(self, message: str = "cancelled by the user; no output was written") -> None:
        super().__init__(message)


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM, SIGHUP) raised as an interrupt, so every ``finally`` and
    cleanup that Ctrl-C runs also runs for it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)
