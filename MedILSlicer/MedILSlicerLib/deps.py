"""What the backend needs besides PyTorch, pinned to the ranges it is tested with (pyproject.toml's
dependencies; ``Testing/test_extension_packaging.py`` keeps the two equal).

The extension ships ``medil_backend`` (code and bundled weights) next to the module; these small
pure-Python / wheel dependencies are installed on first use with ``slicer.util.pip_install``
after asking, and PyTorch comes from Slicer's PyTorch extension.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: (pip requirement, import name)
BACKEND_REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("numpy>=1.24", "numpy"),
    ("scipy>=1.10", "scipy"),
    ("nibabel>=5.0", "nibabel"),
    ("SimpleITK>=2.3", "SimpleITK"),
    ("safetensors>=0.4", "safetensors"),
    ("tqdm>=4.60", "tqdm"),
    ("distributed>=2024.1", "distributed"),  # medil batch (Dask)
)

#: the folder the extension installs medil_backend into: the module's own (see the top-level CMakeLists.txt)
MODULE_DIR = Path(__file__).resolve().parents[1]


def missing_requirements() -> list[str]:
    """The requirements whose package cannot be imported here."""
    return [req for req, name in BACKEND_REQUIREMENTS if importlib.util.find_spec(name) is None]


def shipped_backend() -> Path | None:
    """The medil_backend shipped next to the module (an installed extension), if there is one."""
    path = MODULE_DIR / "medil_backend"
    return path if (path / "__init__.py").is_file() else None


def backend_env(env: dict | None = None) -> dict:
    """The environment of a backend process: the shipped backend's folder first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    if shipped_backend() is not None:
        parts = [str(MODULE_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env
