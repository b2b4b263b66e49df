"""Stand-in of Slicer's launcher for the ctest that slicer_add_python_unittest registers.

It takes the launcher's arguments (``--no-splash``, ``--ignore-slicerrc``, ``--no-main-window``,
``--python-code CODE``) and runs CODE where ``slicer.testing.runUnitTest(paths, name)`` does what
Slicer's does: it puts ``paths`` first on ``sys.path``, imports the module ``name`` and runs its
``<name>Test`` through ``unittest``, exiting non-zero on failure. The application layer is the test
suite's stand-in (``Testing/slicer_app.py``) on a real MRML scene from the slicer-core wheel.
"""

from __future__ import annotations

import os
import sys
import types
import unittest
from pathlib import Path

TESTING = Path(__file__).resolve().parents[1]


def run_unit_test(paths, name: str) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path.insert(0, str(TESTING))
    import slicer
    import slicer_app

    scene = slicer.vtkMRMLScene()
    module_dir = Path(paths[-1])
    slicer_app.install(scene, module_dir)
    for p in reversed(paths):
        sys.path.insert(0, str(p))
    sys.modules.pop(name, None)
    module = __import__(name)
    suite = unittest.TestSuite([getattr(module, f"{name}Test")()])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    sys.exit(0 if result.wasSuccessful() else 1)


def main(argv: list[str]) -> int:
    code = None
    it = iter(argv)
    for arg in it:
        if arg == "--python-code":
            code = next(it)
        elif arg in ("--python-script", "--additional-module-path"):
            next(it)
    if code is None:
        print("SlicerLauncher stand-in: only --python-code is supported", file=sys.stderr)
        return 2
    testing = types.ModuleType("slicer.testing")
    testing.runUnitTest = run_unit_test
    sys.modules["slicer.testing"] = testing
    import slicer

    slicer.testing = testing
    exec(compile(code, "<python-code>", "exec"), {"__name__": "__main__"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
