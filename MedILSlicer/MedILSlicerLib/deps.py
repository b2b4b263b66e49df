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

#: (pip requirement, import name, distribution name)
BACKEND_REQUIREMENTS: tuple[tuple[str, str, str], ...] = (
    ("numpy>=1.24", "numpy", "numpy"),
    ("scipy>=1.10", "scipy", "scipy"),
    ("nibabel>=5.0", "nibabel", "nibabel"),
    ("SimpleITK>=2.3", "SimpleITK", "SimpleITK"),
    ("safetensors>=0.4", "safetensors", "safetensors"),
    ("tqdm>=4.60", "tqdm", "tqdm"),
    ("pydicom>=2.4", "pydicom", "pydicom"),  # Siemens mosaics
)
#: what only a batch run needs (``medil batch`` on Dask): installed when a batch is started, not before
BATCH_REQUIREMENTS: tuple[tuple[str, str, str], ...] = (("distributed>=2024.1", "distributed", "distributed"),)
#: the PyTorch the backend needs (installed through the PyTorch extension, which picks the build for the machine)
TORCH_REQUIREMENT = ">=2.4"


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading numbers of a version (``2.13.0+cpu`` -> (2, 13, 0))."""
    import re

    out = []
    for part in text.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def satisfied(requirement: str, installed: str | None) -> bool:
    """Whether an installed version meets a ``>=X.Y`` requirement (the only form these requirements take)."""
    if installed is None:
        return False
    minimum = requirement.split(">=", 1)[1] if ">=" in requirement else "0"
    return version_tuple(installed) >= version_tuple(minimum)


def installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements=BACKEND_REQUIREMENTS) -> list[str]:
    """The requirements that cannot be imported here, or whose installed version is older than they ask."""
    return [
        req for req, name, dist in requirements if importlib.util.find_spec(name) is None or not satisfied(req, installed_version(dist))
    ]


#: the folder the extension installs medil_backend into: the module's own (see the top-level CMakeLists.txt)
MODULE_DIR = Path(__file__).resolve().parents[1]


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
