"""MedIL backend: resolution-free medical imaging in world coordinates.

Public API::

    from medil_backend import read_volume, write_volume, output_grid, load_model, reconstruct
    vol = read_volume("t1.nii.gz")
    target = output_grid(vol.grid, spacing=1.0)
    out = reconstruct(vol, target, load_model().net)
    write_volume(out, "t1_1mm.nii.gz")
"""

__version__ = "0.1.0"

from .errors import Cancelled, MedILError  # noqa: E402
from .geometry import Grid, Volume, exscribed_grid, output_grid  # noqa: E402
from .io import read_volume, write_volume  # noqa: E402
from .models import list_models, load_model  # noqa: E402
from .ops.reconstruct import reconstruct  # noqa: E402

__all__ = [
    "Cancelled",
    "Grid",
    "MedILError",
    "Volume",
    "exscribed_grid",
    "list_models",
    "load_model",
    "output_grid",
    "read_volume",
    "reconstruct",
    "write_volume",
]
