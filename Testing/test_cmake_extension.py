"""The extension's CMake, run by a real ``cmake`` against a stand-in of Slicer's SlicerConfig.cmake
(Testing/slicer_sdk: only what the extension uses, with Slicer's signatures): configure, install
(the installed tree holds exactly the module's and the backend's files, checked against
``git ls-files``), and the ctest that runs the module's own self-test from the build tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

CMAKE = shutil.which("cmake")
CTEST = shutil.which("ctest")
pytestmark = pytest.mark.skipif(CMAKE is None, reason="needs cmake")
SDK = REPO / "Testing" / "slicer_sdk"
MODULES = "lib/Slicer-5.10/qt-scripted-modules"


def tracked(prefix: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", prefix], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [line for line in out.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmake")
    b = root / "build"
    r = subprocess.run(
        [CMAKE, "-S", str(REPO), "-B", str(b), f"-DSlicer_DIR={SDK}", f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=ON"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Configuring Scripted module: MedILSlicer" in r.stdout
    return root, b


def test_install_holds_exactly_the_modules_and_the_backends_files(build):
    root, b = build
    prefix = root / "install"
    r = subprocess.run([CMAKE, "--install", str(b), "--prefix", str(prefix)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    installed = {p.relative_to(prefix / MODULES).as_posix() for p in (prefix / MODULES).rglob("*") if p.is_file()}
    module = {f.removeprefix("MedILSlicer/") for f in tracked("MedILSlicer") if not f.endswith("CMakeLists.txt")}
    backend = set(tracked("medil_backend"))
    sample = {"MedILSampleData/itk_t1_2x2x3mm.nii.gz", "MedILSampleData/LICENSE.md"}
    expected = module | backend | sample
    assert installed - expected == set(), f"installed but not in the repository: {sorted(installed - expected)}"
    assert expected - installed == set(), f"in the repository but not installed: {sorted(expected - installed)}"
    assert all((prefix / MODULES / f).read_bytes() == (REPO / f).read_bytes() for f in backend)


def test_an_extension_without_its_metadata_is_refused_as_slicer_refuses_it(tmp_path):
    src = tmp_path / "ext"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(Bare)\nfind_package(Slicer REQUIRED)\ninclude(${Slicer_USE_FILE})\n"
        "include(${Slicer_EXTENSION_CPACK})\n"
    )
    r = subprocess.run([CMAKE, "-S", str(src), "-B", str(tmp_path / "b"), f"-DSlicer_DIR={SDK}"], capture_output=True, text=True)
    assert r.returncode != 0 and "EXTENSION_HOMEPAGE is not defined" in r.stderr


@pytest.mark.skipif(CTEST is None, reason="needs ctest")
def test_ctest_runs_the_modules_self_test_from_the_build_tree(build):
    root, b = build
    listed = subprocess.run([CTEST, "-N"], cwd=b, capture_output=True, text=True).stdout
    assert "py_MedILSlicer" in listed
    assert (b / MODULES / "MedILSlicer.py").is_file() and (b / MODULES / "Resources" / "UI" / "MedILSlicer.ui").is_file()
    r = subprocess.run([CTEST, "-R", "py_MedILSlicer", "--output-on-failure"], cwd=b, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "1 tests passed" in r.stdout or "100% tests passed" in r.stdout


def test_the_sdk_script_looks_for_slicers_own_variable_name():
    text = (REPO / "tools" / "configure_with_slicer_core_sdk.sh").read_text()
    assert "Slicer_EXTENSION_CPACK" in text and "SlicerExtensionCPack " not in text
    assert Path(SDK / "SlicerConfig.cmake").read_text().count("Slicer_EXTENSION_CPACK") == 1


def test_the_extensions_index_description_file_and_licence():
    """What the Extensions Index's checks read (its scripts/check_description_files.py): the description file's schema
    keys, the project name equal to the file name, a licence file at the root, the dependency the CMake declares."""
    import json
    import re

    desc = json.loads((REPO / "MedIL.json").read_text())
    schema_keys = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "dicom_support_rule",
                   "build_subdirectory", "enabled", "tier"}  # fmt: skip
    assert set(desc) <= schema_keys and {"$schema", "category", "scm_url"} <= set(desc)
    assert desc["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert "slicer" in desc["scm_url"].rstrip("/").split("/")[-1].lower()  # the index refuses repository names without it
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"project\((\w+)\)", cmake).group(1) == "MedIL"  # equals the description file's name
    assert desc["build_dependencies"] == re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1).split()
    assert desc["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', cmake).group(1)
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]*)"\)', cmake).group(1)
    assert all(re.fullmatch(r"[^(),]+ \([^()]+\)", c.strip()) for c in contributors.split(","))  # "Name (Affiliation)"
    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    import tomllib

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"


def test_every_model_card_states_its_licence_and_its_training_datas():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "card_licences.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
