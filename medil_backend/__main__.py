"""``python -m medil_backend`` and the ``medil`` command's entry point.

The command's modules (numpy, nibabel, torch, ...) take a while to load; Ctrl-C, SIGTERM or SIGHUP
in that time end the command with the same one line as during a run, not an import traceback.
"""

import signal
import sys


def run() -> int:
    # a signal while loading is held until the modules are in (an interrupted import can leave a library
    # half-initialised, some turn the interrupt into an ImportError, torch's C++ start-up aborts); nothing
    # has started yet. Signals the caller ignores (nohup, a background job) stay ignored.
    held: list[int] = []
    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        from .cli import main
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held:
        how = "" if held[0] == signal.SIGINT else f" ({signal.Signals(held[0]).name})"
        print(f"medil: interrupted{how}; no output was written", file=sys.stderr)
        return 128 + int(held[0])
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
