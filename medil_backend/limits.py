"""The memory limit of a job: one parsing of ``--max-memory`` for every command (torch-free, so a
file's declared size can be checked against it before anything heavy is imported or read)."""

from __future__ import annotations

import math
import operator

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


#: seeds are unsigned 32-bit numbers (the range numpy's legacy seeding and most tools accept)
MAX_SEED = 2**32 - 1


def check_seed(seed, count: int = 1) -> int:
    """``seed`` as an int, checked so that ``seed .. seed + count - 1`` all lie in 0 .. 2**32-1."""
    try:
        s = operator.index(seed)
    except TypeError:
        raise MedILError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}", options=("seed",)) from None
    if s < 0 or s + max(int(count), 1) - 1 > MAX_SEED:
        span = f"; with {count} samples, at most {MAX_SEED - count + 1}" if count > 1 else ""
        raise MedILError(f"the seed must be a whole number from 0 to {MAX_SEED}{span}, got {s}", options=("seed",))
    return s
