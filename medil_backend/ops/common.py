"""Shared plumbing of the operations: device choice, progress callbacks and cancel tokens."""

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
            raise MedILError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
        return torch.device("cuda" if name == "gpu" else name)
    if name == "cpu":
        return torch.device("cpu")
    raise MedILError(f"device {device!r} is not known; use auto, cpu or cuda")


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
