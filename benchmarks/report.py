"""What every benchmark does with its result: print it as JSON, and write it to a file when asked."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | Path | None = None) -> str:
    """Print ``result`` as indented JSON and, with ``out``, write the same text there; returns the text."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return text
