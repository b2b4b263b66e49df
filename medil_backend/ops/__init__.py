"""Operations: model + geometry + chunking + progress. Plain functions, no argparse, Slicer or Qt."""

from .reconstruct import reconstruct

__all__ = ["reconstruct"]
