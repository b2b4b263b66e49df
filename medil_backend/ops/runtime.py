"""Runtime policy of the operations: device and precision choice, progress callbacks with ETA, cancel tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import Cancelled, MedILError
from ..limits import MAX_SEED, check_seed  # noqa: F401 (the operations' seed check, torch-free)

Progress = Callable[[float, str], None]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a user error."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") or name == "gpu":
        if not torch.cuda.is_available():
            raise MedILError(
                "a CUDA GPU was asked for but none is available; run on the CPU or let the device be chosen automatically",
                options=("device",),
            )
        return torch.device("cuda" if name == "gpu" else name)
    if name == "cpu":
        return torch.device("cpu")
    raise MedILError(f"device {device!r} is not known; use auto, cpu or cuda", options=("device",))


def check_cancel(cancel: Any) -> None:
    """Raise :class:`Cancelled` if the token (a ``threading.Event``-like object or a callable) is set."""
    if cancel is None:
        return
    flag = cancel.is_set() if hasattr(cancel, "is_set") else bool(cancel())
    if flag:
        raise Cancelled()


def report(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(max(fraction, 0.0), 1.0), message)


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16), as oneDNN reports it."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older torch or no oneDNN
        return False


def resolve_precision(precision: str | None, device: torch.device, *, iterative: bool = False) -> torch.dtype:
    """The one precision rule of every task. ``auto``: bfloat16 on CUDA, and on CPUs with native bf16 for
    one-pass work (decoding); float32 otherwise. ``iterative`` work (a network trained on the scan, diffusion
    steps, data-consistency rounds) compounds bf16's rounding over many steps: on a CPU ``auto`` keeps it in
    float32, where bf16 buys little speed; an explicit ``bfloat16`` is honoured where the hardware has it.

    ``bfloat16`` on a CPU without native bf16 also runs in float32: oneDNN emulates bf16 there, measured
    20x slower than float32 (58 s against 3 s for a 96x96x60 output on one core) and about 3x over the
    memory plan (1.09 GB at a 0.4 GB limit), so it would buy neither speed nor memory.
    """
    name = (precision or "auto").lower()
    if name not in PRECISIONS:
        raise MedILError(f"precision {precision!r} is not known; use auto, float32 or bfloat16", options=("precision",))
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16 if device.type != "cpu" or cpu_has_fast_bf16() else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() and not iterative else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the convolutions and matrix products (a no-op context for float32)."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _load_libc():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, Windows, musl): nothing to tune
        return None


_GLIBC = _load_libc()
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 4 * 2**20
"""Blocks at least this large get their own mapping, returned to the system when freed."""


def bound_allocator() -> None:
    """Make freed tensors leave the process at once (glibc; a no-op elsewhere).

    glibc raises its mmap threshold as large blocks are freed, after which tile-sized tensors
    come from the heap arenas and their freed pages stay resident, scattered: the peak resident
    memory of one run then varied from 0.70 to 0.83 GB under a 0.75 GB limit. A fixed 4 MiB
    threshold gives every activation its own mapping; the same run peaks at 0.43 GB, every time.
    """
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)
