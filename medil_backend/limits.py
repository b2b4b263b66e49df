"""The memory limit of a job: one parsing of ``--max-memory`` for every command (torch-free, so a
file's declared size can be checked against it before anything heavy is imported or read)."""

from __future__ import annotations

import math

from .errors import MedILError

GB = float(2**30)
DEFAULT_MAX_MEMORY_GB = 3.0


def check_memory_limit(max_memory_gb: float | None) -> float:
    """The memory limit in bytes (default 3 GB); a non-positive or non-finite limit is a user error."""
    if max_memory_gb is None:
        return DEFAULT_MAX_MEMORY_GB * GB
    try:
        value = float(max_memory_gb)
    except (TypeError, ValueError):
        raise MedILError(f"the memory limit must be a number of GB, got {max_memory_gb!r}", options=("max_memory",)) from None
    if not math.isfinite(value) or value <= 0 or value > 1e6:
        raise MedILError(f"the memory limit must be a positive number of GB (at most 1e6), got {max_memory_gb!r}", options=("max_memory",))
    return value * GB
