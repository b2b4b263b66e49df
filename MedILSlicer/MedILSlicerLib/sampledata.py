"""The MedIL sample in Slicer's Sample Data module: the bundled thick-slice T1 (the README's main
job), loaded from the file the extension ships, checked by its SHA256 (pure Python, no Slicer)."""

from __future__ import annotations

from pathlib import Path

from .deps import MODULE_DIR

CATEGORY = "MedIL"
SAMPLE_NAME = "MedILThickT1"
FILE_NAME = "itk_t1_2x2x3mm.nii.gz"
SHA256 = "e0e5975587f3f7916804bdd317c493cdb99cdb3703bf2671d458528f62510327"
NODE_NAME = "MedILThickT1_2x2x3mm"

#: where the file is: next to the module in an installed extension (the top-level CMakeLists.txt puts it
#: there), else in the source tree's examples/data
CANDIDATES = (MODULE_DIR / "MedILSampleData" / FILE_NAME, MODULE_DIR.parent / "examples" / "data" / FILE_NAME)


def sample_path() -> Path | None:
    return next((p for p in CANDIDATES if p.is_file()), None)


def register(sample_data_logic) -> bool:
    """Register the sample with ``SampleData.SampleDataLogic``; False (nothing registered) if the file is missing."""
    path = sample_path()
    if path is None:
        return False
    sample_data_logic.registerCustomSampleDataSource(
        category=CATEGORY,
        sampleName=SAMPLE_NAME,
        uris=path.as_uri(),
        fileNames=FILE_NAME,
        nodeNames=NODE_NAME,
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "MedILSlicer.png"),
        loadFileType="VolumeFile",
        checksums=f"SHA256:{SHA256}",
    )
    return True
