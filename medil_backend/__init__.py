"""MedIL backend: resolution-free medical imaging in world coordinates.

Public API::

    from medil_backend import read_volume, write_volume, output_grid, load_model, reconstruct
    vol = read_volume("t1.nii.gz")
    target = output_grid(vol.grid, spacing=1.0)
    out = reconstruct(vol, target, load_model().net)
    write_volume(out, "t1_1mm.nii.gz")
"""

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562), so ``import medil_backend`` (and the
# ``medil`` command's start) does not load torch: a Ctrl-C during start-up reaches ``main``.
_EXPORTS = {
    "Cancelled": ".errors",
    "MedILError": ".errors",
    "Grid": ".geometry",
    "Volume": ".geometry",
    "exscribed_grid": ".geometry",
    "output_grid": ".geometry",
    "read_volume": ".io",
    "write_volume": ".io",
    "list_models": ".models",
    "load_model": ".models",
    "reconstruct": ".ops.reconstruct",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
