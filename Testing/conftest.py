"""Shared fixtures: real volumes from ../shared/data and a tiny, fast MedIL model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

# CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) draws the same examples every run: a property test that a new random
# draw breaks fails a developer's run, never a landing. The default profile keeps exploring.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDIL_SHARED_DATA", REPO.parent / "shared" / "data"))
EXAMPLE = REPO / "examples" / "data" / "itk_t1_2x2x3mm.nii.gz"

torch.set_num_threads(min(2, torch.get_num_threads()))


def _has_train_extra() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in ("lightning", "monai", "torchio"))
    except (ImportError, ValueError):
        return False


HAS_TRAIN_EXTRA = _has_train_extra()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``train`` need the train extra (Lightning, MONAI, TorchIO): skipped, saying so, without it."""
    if HAS_TRAIN_EXTRA:
        return
    skip = pytest.mark.skip(reason="needs the train extra: pip install -e '.[train]'")
    for item in items:
        if "train" in item.keywords:
            item.add_marker(skip)


def shared(rel: str) -> Path:
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"shared data file {p} is not available")
    return p


#: A MedIL architecture small enough for tests to run in seconds.
TINY_CONFIG = dict(
    channels=[4, 8],
    factors=[2],
    n_units=1,
    encoder_norm="none",
    decoder_norm="channel",
    latent_channels=4,
    latent_spacing=4.0,
    lte_frequencies=8,
    inr_width=8,
    inr_blocks=1,
    global_skip=True,
)


@pytest.fixture(scope="session")
def tiny_config():
    from medil_backend.nn import MedILConfig

    return MedILConfig.from_dict(TINY_CONFIG)


@pytest.fixture
def tiny_model(tiny_config):
    from medil_backend.nn import MedILAutoencoder

    torch.manual_seed(0)
    net = MedILAutoencoder(tiny_config)
    # perturb the zero-initialised INR tails so the LTE path is exercised, not just its skip
    with torch.no_grad():
        for lte in (net.encoder_lte, net.decoder_lte):
            lte.inr.tail[1].weight.normal_(0, 0.05)
        net.decoder.head.weight.normal_(0, 0.05)
    return net.eval()


@pytest.fixture
def model_dir(tmp_path, tiny_model, monkeypatch):
    """A user model folder holding the tiny model as ``tiny``, registered through $MEDIL_MODELS."""
    from medil_backend.models import export_model

    folder = tmp_path / "models"
    export_model(tiny_model, folder, "tiny", {"tasks": ["reconstruct"], "modality": "mri", "description": "test model"})
    monkeypatch.setenv("MEDIL_MODELS", str(folder))
    return folder


TINY_AE = {**TINY_CONFIG, "latent_channels": 2, "kl": True, "global_skip": False}  # a generative autoencoder: KL, no skip
TINY_LDM = dict(latent_channels=2, channels=[8, 16], groups=4, time_dim=16, timesteps=100, latent_spacing=4.0)
DEFAULT_SPACE = {"shape": [24, 28, 20], "spacing": [2.0, 2.0, 2.0], "centre": [0.0, 0.0, 0.0]}


@pytest.fixture
def sampler_dir(tmp_path, monkeypatch):
    """A user model folder with a tiny generative autoencoder and a tiny diffusion model on its latents."""
    from medil_backend.models import export_model, latent_space_ref, load_model
    from medil_backend.nn import MedILAutoencoder, MedILConfig
    from medil_backend.nn.diffusion import DiffusionConfig, LatentDiffusionUNet

    torch.manual_seed(0)
    ae = MedILAutoencoder(MedILConfig.from_dict(TINY_AE)).eval()
    folder = tmp_path / "models"
    export_model(ae, folder, "tiny-gen", {"tasks": ["reconstruct"], "modality": "mri", "description": "test"})
    ldm = LatentDiffusionUNet(DiffusionConfig.from_dict(TINY_LDM))
    with torch.no_grad():  # a random (not zero-initialised) head, so the denoiser's output depends on its input
        ldm.head[-1].weight.normal_(0, 0.1)
    card = {
        "tasks": ["sample"],
        "modality": "mri",
        "description": "test sampler",
        "autoencoder": latent_space_ref(load_model(folder / "tiny-gen.json")),
        "default_space": DEFAULT_SPACE,
        "sampling": {"steps": 2},
        "native_spaces": [
            {"weight": 0.5, "mean": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "var": [0.01] * 6},
            {"weight": 0.5, "mean": [0.0, 0.0, np.log(5.0), 0.0, 0.0, 0.1], "var": [0.01] * 6},
        ],
    }
    export_model(ldm, folder, "tiny-ldm", card)
    monkeypatch.setenv("MEDIL_MODELS", str(folder))
    return folder


@pytest.fixture
def small_mri(tmp_path):
    """A small real MRI crop (from the bundled example) written as NIfTI, with its array."""
    from medil_backend.io import read_volume, write_volume

    v = read_volume(EXAMPLE)
    v.array = np.ascontiguousarray(v.array[40:72, 40:70, 20:44])
    v.affine = v.grid.sub_grid((40, 40, 20), (72, 70, 44)).affine
    path = tmp_path / "small.nii.gz"
    write_volume(v, path, dtype=v.array.dtype)
    return path


@pytest.fixture(autouse=True)
def _utf8_locale():
    """Qt and VTK (Slicer's MRML) reset the C locale when they start, which makes later tests decode
    their subprocesses' output as ASCII; keep the character type UTF-8 whatever ran before."""
    import locale

    yield
    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
            try:
                locale.setlocale(locale.LC_CTYPE, name)
                break
            except locale.Error:
                continue


def head_stack_files(folder: Path, size: int = 48) -> list[Path]:
    """Three orthogonal 4 mm stacks (NRRD) of a ``size`` mm cube of a real 1 mm T1 head (the centre of the pydeface
    mean head), the second and third moved by 2-3 degrees and about 1.5 mm."""
    from medil_backend.geometry import Volume
    from medil_backend.io import read_volume, write_volume
    from medil_backend.simulate_stacks import orthogonal_stacks, rigid

    head = read_volume(shared("mri/pydeface_mean_head_t1.nii.gz"))
    s = [(n - size) // 2 for n in head.array.shape]
    head = Volume(
        np.ascontiguousarray(head.array[s[0] : s[0] + size, s[1] : s[1] + size, s[2] : s[2] + size]).astype(np.float32),
        head.grid.sub_grid(s, [a + size for a in s]).affine,
        modality="mri",
    )
    c = head.grid.voxel_to_world(np.array([[(size - 1) / 2.0] * 3]))[0]
    paths = []
    for k, v in enumerate(orthogonal_stacks(head, 4, [np.eye(4), rigid([2, 0, -1], [1, -1, 0], c), rigid([0, -2, 1], [0, 1, 1], c)])):
        paths.append(folder / f"stack{k}.nrrd")
        write_volume(v, paths[-1])
    return paths


def load_node(scene, path):
    """A real vtkMRMLScalarVolumeNode read from ``path`` by a real storage node (needs the slicer-core wheel)."""
    import slicer

    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    node.SetName(Path(path).name.split(".")[0])
    return node


def write_dicom_series(
    folder: Path, array: np.ndarray, grid, modality: str = "MR", series_uid: str = "1.2.826.0.1.3680043.2.1125.1.999"
) -> Path:
    """``array`` (int16, on the RAS ``grid``) written by SimpleITK as a DICOM series, one file per slice of the last axis."""
    import SimpleITK as sitk

    from medil_backend.geometry import Grid

    folder.mkdir(parents=True, exist_ok=True)
    lg = Grid(array.shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid.affine)
    img = sitk.GetImageFromArray(np.asarray(array, np.int16).transpose(2, 1, 0))
    img.SetSpacing(lg.spacing.tolist())
    img.SetDirection(lg.direction.ravel().tolist())
    img.SetOrigin(lg.origin.tolist())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    tags = {"0020|000e": series_uid, "0020|0037": "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7]))), "0008|0060": modality}
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        s.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
        s.SetMetaData("0020|0013", str(k))
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    return folder
