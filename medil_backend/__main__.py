"""``python -m medil_backend`` and the ``medil`` command's entry point.

The command's modules (numpy, nibabel, torch, ...) take a while to load; Ctrl-C in that time ends
the command with the same one line as Ctrl-C during a run, not an import traceback.
"""

import signal
import sys


def run() -> int:
    # Ctrl-C while loading is held until the modules are in (an interrupted import can leave a library
    # half-initialised, and some turn the interrupt into an ImportError); nothing has started yet
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        from .cli import main
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        print("medil: interrupted; no output was written", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
