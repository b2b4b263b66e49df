"""The Slicer extension ships its backend: the on-demand requirements match pyproject.toml and are checked by
version, and an installed layout runs the backend from the copy next to the module. (What the install rules
take is checked by real CMake: Testing/test_cmake_extension.py.)"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO, load_node


def install_rule() -> tuple[list[str], list[str]]:
    """(included, excluded) patterns of the top-level install(DIRECTORY .../medil_backend ...) rule."""
    text = (REPO / "CMakeLists.txt").read_text()
    m = re.search(r"install\(DIRECTORY \$\{CMAKE_CURRENT_SOURCE_DIR\}/medil_backend(.*?)\n  \)", text, re.S)
    assert m, "CMakeLists.txt has no install rule for medil_backend"
    body = m.group(1)
    assert "DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in body  # beside the module's scripts
    excluded = re.findall(r'PATTERN "([^"]+)" EXCLUDE', body)
    included = [p for p in re.findall(r'PATTERN "([^"]+)"', body) if p not in excluded]
    return included, excluded


def package_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "medil_backend"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in (REPO / "medil_backend").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [f for f in files if f.exists()]


def installed(path: Path, included: list[str], excluded: list[str]) -> bool:
    rel = path.relative_to(REPO / "medil_backend")
    if any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in excluded):
        return False
    return any(fnmatch.fnmatch(rel.name, pat) for pat in included)


def test_on_demand_requirements_match_pyproject():
    sys.path.insert(0, str(REPO / "MedILSlicer"))
    from MedILSlicerLib.deps import BACKEND_REQUIREMENTS, BATCH_REQUIREMENTS, TORCH_REQUIREMENT, installed_version

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    deps = [d.split("#")[0].strip() for d in deps]
    assert f"torch{TORCH_REQUIREMENT}" in deps
    assert sorted(r for r, _, _ in BACKEND_REQUIREMENTS + BATCH_REQUIREMENTS) == sorted(d for d in deps if not d.startswith("torch"))
    for _, name, dist in BACKEND_REQUIREMENTS + BATCH_REQUIREMENTS:
        assert importlib.util.find_spec(name) is not None and installed_version(dist)  # the import and distribution names are right


def test_requirements_are_checked_by_version(monkeypatch):
    sys.path.insert(0, str(REPO / "MedILSlicer"))
    from MedILSlicerLib import deps

    assert deps.satisfied(">=2.4", "2.13.0+cpu") and not deps.satisfied(">=2.4", "2.3.1") and deps.satisfied(">=1.10", "1.10")
    assert not deps.satisfied(">=0.4", None)
    assert deps.missing_requirements() == []
    real = deps.installed_version
    monkeypatch.setattr(deps, "installed_version", lambda d: "1.0" if d == "scipy" else real(d))
    assert deps.missing_requirements() == ["scipy>=1.10"]  # present, but older than the backend needs
    assert "distributed>=2024.1" not in [r for r, _, _ in deps.BACKEND_REQUIREMENTS]  # only a batch run installs Dask


def test_an_installed_layout_runs_the_shipped_backend(tmp_path):
    """Copy what the install rules take into a fresh folder (as CPack would), then run the backend the way the module does."""
    lib = tmp_path / "qt-scripted-modules"
    included, excluded = install_rule()
    for f in package_files():
        if installed(f, included, excluded):
            dest = lib / f.relative_to(REPO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    shutil.copytree(REPO / "MedILSlicer" / "MedILSlicerLib", lib / "MedILSlicerLib", ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.spec_from_file_location("shipped_deps", lib / "MedILSlicerLib" / "deps.py")
    deps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deps)
    assert deps.shipped_backend() == lib / "medil_backend"
    env = deps.backend_env({"PATH": "/usr/bin:/bin"})
    where = subprocess.run(
        [sys.executable, "-c", "import medil_backend; print(medil_backend.__file__)"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(lib)  # the copy next to the module, not the development tree
    models = subprocess.run(
        [sys.executable, "-m", "medil_backend", "models", "--json"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert models.returncode == 0, models.stderr
    bundled = {m["name"]: m for m in json.loads(models.stdout) if m["source"] == "bundled"}
    assert "medil-brain-t1" in bundled and Path(bundled["medil-brain-t1"]["card"]).is_relative_to(lib)


def sample_install_rule() -> tuple[list[Path], str]:
    """(files, destination) of the top-level install(FILES ...) rule of the Sample Data module's sample."""
    text = (REPO / "CMakeLists.txt").read_text()
    m = re.search(r"install\(FILES(.*?)DESTINATION (\S+)", text, re.S)
    assert m, "CMakeLists.txt has no install rule for the sample data"
    files = [REPO / f for f in re.findall(r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)", m.group(1))]
    return files, m.group(2)


def test_the_sample_data_registers_and_loads_from_the_installed_layout(tmp_path):
    """What Slicer's Sample Data module does with our registration: fetch the URI (urllib), check the SHA256, load it."""
    import hashlib
    import urllib.request

    files, destination = sample_install_rule()
    assert destination == "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/MedILSampleData"
    lib = tmp_path / "qt-scripted-modules"
    (lib / "MedILSampleData").mkdir(parents=True)
    for f in files:
        shutil.copy2(f, lib / "MedILSampleData" / f.name)
    shutil.copytree(REPO / "MedILSlicer" / "MedILSlicerLib", lib / "MedILSlicerLib", ignore=shutil.ignore_patterns("__pycache__"))
    ours = ("MedILSlicerLib", "MedILSlicerLib.deps", "MedILSlicerLib.sampledata")
    saved = {name: sys.modules.pop(name) for name in ours if name in sys.modules}  # import the installed copy
    sys.path.insert(0, str(lib))
    try:
        from MedILSlicerLib import sampledata

        calls = []

        class SampleDataLogic:  # records the call with Slicer's keyword names
            @staticmethod
            def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None, nodeNames=None,
                                               customDownloader=None, thumbnailFileName=None, loadFileTypes=None, loadFiles=None,
                                               loadFileProperties=None, checksums=None, loadFileType=None):  # fmt: skip
                calls.append(dict(category=category, sampleName=sampleName, uris=uris, fileNames=fileNames, checksums=checksums))

        assert sampledata.register(SampleDataLogic) is True
    finally:
        sys.path.remove(str(lib))
        for name in ours:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    (call,) = calls
    module = (REPO / "MedILSlicer" / "MedILSlicer.py").read_text()  # the module registers it once Slicer has started
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in module and "sampledata.register(" in module
    assert call["category"] == "MedIL" and call["uris"].startswith("file://") and str(lib) in call["uris"]
    fetched = tmp_path / call["fileNames"]
    urllib.request.urlretrieve(call["uris"], fetched)
    algo, digest = call["checksums"].split(":")
    assert algo == "SHA256" and hashlib.sha256(fetched.read_bytes()).hexdigest() == digest
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel")
    node = load_node(slicer.vtkMRMLScene(), fetched)
    assert node.GetImageData().GetDimensions() == (128, 128, 62)
