"""Pure torch modules: tensors and grids in, tensors out (no I/O, no normalisation, no device policy)."""

from .autoencoder import MedILAutoencoder, MedILConfig
from .lte import LTE3d, trilinear_sample

__all__ = ["LTE3d", "MedILAutoencoder", "MedILConfig", "trilinear_sample"]
