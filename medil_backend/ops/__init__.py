"""Operations: model + geometry + tiling + progress. Plain functions, no argparse, Slicer or Qt."""

from ..models.registry import run_model
from .fixed_grid import fixed_grid_reconstruct
from .reconstruct import reconstruct

__all__ = ["fixed_grid_reconstruct", "reconstruct", "run_model"]
