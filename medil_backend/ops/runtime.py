"""Runtime policy of the operations: device and precision choice, progress callbacks with ETA, cancel tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import Cancelled, MedILError

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


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise."""
    name = (precision or "auto").lower()
    if name not in PRECISIONS:
        raise MedILError(f"precision {precision!r} is not known; use auto, float32 or bfloat16", options=("precision",))
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the convolutions and matrix products (a no-op context for float32)."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _load_malloc_trim():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Tiles of varying shapes leave freed blocks scattered in glibc's arenas, which still count as
    resident memory; trimming after each tile keeps the peak at what one tile needs.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
