"""Reading files that come from elsewhere (model cards, weights): regular files only, opened without
following symbolic links and without blocking (a FIFO or device is refused, never waited on), and
size-capped before a byte is hashed or parsed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import MedILError

#: a model card is a few kB; anything over this is not one
MAX_CARD_BYTES = 1 << 20
#: the largest weights file MedIL loads (the bundled ones are under 25 MB)
MAX_WEIGHTS_BYTES = 4 << 30


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link, pipe or device) of at most ``max_bytes``."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise MedILError(f"the {what} {path} does not exist; reinstall or re-export it") from None
    except OSError as exc:
        if os.path.islink(path):
            raise MedILError(
                f"the {what} {path} is a symbolic link; MedIL opens only the file itself: copy it in place of the link"
            ) from None
        raise MedILError(f"cannot open the {what} {path} ({exc.strerror}); check its permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MedILError(f"the {what} {path} is not a regular file (a pipe, device or folder); replace it with the file itself")
        if st.st_size > max_bytes:
            raise MedILError(
                f"the {what} {path} has {st.st_size} bytes, more than the {max_bytes} such a file may have; it is not a MedIL {what}"
            )
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # it grew while being read
                raise MedILError(f"the {what} {path} grew past {max_bytes} bytes while being read; it is not a MedIL {what}")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise MedILError(f"cannot read the {what} {path} ({exc.strerror}); check the file") from None
    finally:
        os.close(fd)


def read_json_file(path: str | os.PathLike, what: str = "model card", max_bytes: int = MAX_CARD_BYTES):
    """A small JSON file (regular, capped; nesting too deep for the parser is refused, not a traceback)."""
    data = read_regular_file(path, max_bytes, what)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise MedILError(f"the {what} {path} is nested too deeply to be a MedIL {what}; reinstall or re-export it") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MedILError(f"the {what} {path} is not valid JSON ({str(exc)[:120]}); reinstall or re-export it") from None
