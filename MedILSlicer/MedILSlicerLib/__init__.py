"""Helpers of the MedILSlicer module that import without the Slicer application.

- :mod:`.jobs`: the backend as a separate process, JSON-line progress, cancel by killing the process tree;
- :mod:`.mrml_geometry`: MRML volume nodes <-> world geometry (IJKToRAS, parent transforms);
- :mod:`.logic`: the module logic (MRML only; no Qt), used by the GUI, batch scripts and tests.
"""
