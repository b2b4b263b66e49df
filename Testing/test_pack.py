"""Data packs: a round trip keeps exact affines and values within the stored precision, the body
crop keeps the body, and the data module trains from a pack (numpy only)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, shared

from medil_backend.io import read_volume
from medil_backend.training.pack import body_box, read_meta, read_pack, write_pack


def test_a_pack_round_trips_real_volumes(tmp_path):
    files = {
        "spine_ct": ("ct/spine_ct_1p5mm.nii.gz", "ct"),
        "robex": ("mri/robex_t1_1p5mm.nii.gz", "mri"),
        "t2": ("mri/spine_t2_1p5mm.nii.gz", "mri"),
    }
    vols = {name: read_volume(shared(rel), modality=mod) for name, (rel, mod) in files.items()}
    meta = write_pack([(n, v, f"sha-{n}") for n, v in vols.items()], tmp_path / "p.npz")
    assert read_meta(tmp_path / "p.npz") == meta
    back = {name: (v, e) for name, v, e in read_pack(tmp_path / "p.npz")}
    for name, src in vols.items():
        v, e = back[name]
        lo, hi = e["crop"]
        ref = src.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.testing.assert_array_equal(v.affine, src.grid.sub_grid(lo, hi).affine)  # exact, not approximately
        assert v.modality == src.modality and e["sha256"] == f"sha-{name}"
        if np.issubdtype(src.array.dtype, np.integer):
            assert v.array.dtype == src.array.dtype
            np.testing.assert_array_equal(v.array, ref)
        else:
            np.testing.assert_allclose(v.array, ref, atol=e["scale"] / 2 * 1.001 + 1e-6)
        # the crop keeps the whole body
        body = body_box(src.array, src.modality, margin=0)
        assert all(a <= b for a, b in zip(lo, body[0])) and all(a >= b for a, b in zip(hi, body[1]))
    assert back["robex"][0].array.size < vols["robex"].array.size  # air around the head was cropped away


def test_not_a_pack_is_a_clear_error(tmp_path):
    from medil_backend.errors import MedILError

    np.savez(tmp_path / "x.npz", meta=np.frombuffer(b'{"format": "other"}', dtype=np.uint8))
    with pytest.raises(MedILError, match="not a MedIL data pack"):
        read_pack(tmp_path / "x.npz")
    with pytest.raises(MedILError, match="does not exist"):
        read_pack(tmp_path / "missing.npz")


BLOCK = "import sys; sys.modules.update(dict.fromkeys(['nibabel', 'SimpleITK', 'torchio', 'monai'])); "


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_the_data_module_trains_from_a_pack_without_nibabel_or_simpleitk(tmp_path):
    """The GPU machine has neither: training from packs must not import them (nor TorchIO or MONAI)."""
    from conftest import EXAMPLE

    write_pack([("itk", read_volume(EXAMPLE, modality="mri"), "sha-itk")], tmp_path / "train.npz")
    args = [
        "train",
        "--config",
        str(REPO / "training/configs/tiny-test.yaml"),
        "--data.train",
        str(tmp_path / "train.npz"),
        "--data.val",
        str(tmp_path / "train.npz"),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    code = BLOCK + f"from medil_backend.cli import main; sys.exit(main({args!r}))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert list((tmp_path / "run").rglob("*.ckpt"))


def test_one_volume_of_a_pack_by_name(tmp_path):
    """``pack.npz#name`` (the GPU recipes' heads and validation volumes) reads that volume alone; a wrong name is refused."""
    from medil_backend.errors import MedILError
    from medil_backend.training.data import VolumeDataModule

    a, b = (read_volume(shared(f"mri/{n}.nii.gz"), modality="mri") for n in ("colin27_t1_1mm", "robex_t1_1p5mm"))
    write_pack([("mri/a.nii.gz", a, "sha-a"), ("mri/b.nii.gz", b, "sha-b")], tmp_path / "p.npz")
    dm = VolumeDataModule(str(tmp_path / "p.npz"))
    (vol,) = dm._load([f"{tmp_path / 'p.npz'}#mri/b.nii.gz"])
    assert vol["path"].endswith("#mri/b.nii.gz") and vol["sha256"] == "sha-b" and vol["array"].ndim == 3  # cropped to its body
    with pytest.raises(MedILError, match="no volume named"):
        dm._load(f"{tmp_path / 'p.npz'}#mri/c.nii.gz")
