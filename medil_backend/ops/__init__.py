"""Operations: model + geometry + chunking + progress. Plain functions, no argparse, Slicer or Qt."""

from .fixed_grid import fixed_grid_reconstruct
from .reconstruct import reconstruct


def run_model(volume, target, net, **kwargs):
    """Reconstruct ``volume`` onto ``target`` with any registry network (MedIL or the fixed-grid baseline)."""
    from ..nn.fixed_grid import FixedGridAutoencoder

    if isinstance(net, FixedGridAutoencoder):
        kwargs.pop("cancel", None), kwargs.pop("max_memory_gb", None), kwargs.pop("slab", None)
        return fixed_grid_reconstruct(volume, target, net, **kwargs)
    return reconstruct(volume, target, net, **kwargs)


__all__ = ["fixed_grid_reconstruct", "reconstruct", "run_model"]
