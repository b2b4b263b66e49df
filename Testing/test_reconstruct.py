import threading

import numpy as np
import pytest

from medil_backend.errors import Cancelled, MedILError
from medil_backend.geometry import canonical_order, output_grid
from medil_backend.io import read_volume
from medil_backend.ops.memory import RUNTIME_OVERHEAD_BYTES
from medil_backend.ops.reconstruct import held_by_reconstruction, plan_reconstruction, reconstruct


def resident_bytes(net, grid, target, copy_bytes=0) -> float:
    """What a reconstruction holds for its whole length with its output in memory (the shared plan's items)."""
    return sum(held_by_reconstruction(net, grid, copy_bytes).values()) + 4.0 * target.num_voxels


def _just_enough(net, v, target, tiles: tuple[int, int] = (8, 400)) -> float:
    """A memory limit (GB) just above what the call holds anyway, so that decoding takes several tiles."""
    c = canonical_order(v)
    held = resident_bytes(net, c.grid, target, c.array.nbytes if c is not v else 0) + RUNTIME_OVERHEAD_BYTES
    for extra in np.arange(60e6, 5e6, -1e6):
        limit = (held + extra) / 2**30
        try:
            n = plan_reconstruction(net, c.grid, target, max_memory_gb=limit, precision="float32").summary()["decode"]
        except MedILError:
            continue
        if tiles[0] <= n <= tiles[1]:
            return limit
    raise AssertionError("no memory limit gives the wanted number of tiles")


@pytest.mark.parametrize("orientation", ["input", "RAS", "aligned"])
def test_reconstruct_in_tiles_equals_one_tile(tiny_model, small_mri, orientation):
    v = read_volume(small_mri)
    target = output_grid(v.grid, spacing=[0.9, 0.7, 1.1], orientation=orientation)
    whole = reconstruct(v, target, tiny_model, device="cpu", precision="float32", max_memory_gb=8)
    # a limit just above what the call holds anyway forces many small tiles on both sides
    parts = reconstruct(v, target, tiny_model, device="cpu", precision="float32", max_memory_gb=_just_enough(tiny_model, v, target))
    assert parts.meta["tiles"]["decode"] > 4
    np.testing.assert_allclose(parts.array, whole.array, atol=1e-5 * max(1.0, float(np.abs(whole.array).max())))
    assert whole.grid.same_as(target, atol=0)


def test_a_limit_that_would_only_fit_absurdly_small_tiles_is_refused(tiny_model, small_mri):
    v = read_volume(small_mri)
    target = output_grid(v.grid, spacing=[0.9, 0.7, 1.1], orientation="RAS")
    held = resident_bytes(tiny_model, v.grid, target) + RUNTIME_OVERHEAD_BYTES
    with pytest.raises(MedILError, match="more than 8 times over: raise the memory limit"):
        plan_reconstruction(tiny_model, v.grid, target, max_memory_gb=(held + 14e6) / 2**30, precision="float32")


def test_memory_limit_too_small_for_the_volumes_themselves(tiny_model, small_mri):
    v = read_volume(small_mri)
    with pytest.raises(MedILError, match="over the memory limit"):
        reconstruct(v, output_grid(v.grid, spacing=0.05), tiny_model, device="cpu", max_memory_gb=0.01)


@pytest.mark.parametrize("limit", [0, -1, float("nan"), float("inf"), 1e300, "lots"])
def test_bad_memory_limit(tiny_model, small_mri, limit):
    v = read_volume(small_mri)
    with pytest.raises(MedILError, match="memory limit must be a (positive )?number"):
        reconstruct(v, v.grid, tiny_model, device="cpu", max_memory_gb=limit)


def test_progress_and_cancel(tiny_model, small_mri):
    v = read_volume(small_mri)
    target = output_grid(v.grid, spacing=0.7)
    seen, messages = [], []
    small = _just_enough(tiny_model, v, target)

    def record(f, m):
        seen.append(f)
        messages.append(m)

    reconstruct(v, target, tiny_model, device="cpu", max_memory_gb=small, progress=record)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    # progress moves while encoding too, and later tiles carry an ETA
    assert any(m.startswith("encoding tile") for m in messages) and any("left" in m for m in messages)
    assert 0 < max(f for f, m in zip(seen, messages) if m.startswith("encoding")) < 1
    token = threading.Event()

    def cancel_after_first(f, m):
        if f > 0:
            token.set()

    with pytest.raises(Cancelled):
        reconstruct(v, target, tiny_model, device="cpu", max_memory_gb=small, progress=cancel_after_first, cancel=token)


def test_output_in_input_units_and_modality(tiny_model, small_mri):
    import torch

    v = read_volume(small_mri)
    with torch.no_grad():  # silence the decoder: the global skip alone is trilinear interpolation of the input
        tiny_model.decoder.head.weight.zero_()
        tiny_model.decoder.head.bias.zero_()
    out = reconstruct(v, v.grid, tiny_model, device="cpu", precision="float32")
    assert out.modality == "mri" and out.array.dtype == np.float32
    np.testing.assert_allclose(out.array, v.array, atol=1e-3)


def test_empty_volume_refused(tiny_model, small_mri):
    v = read_volume(small_mri)
    v.array = np.zeros_like(v.array)
    with pytest.raises(MedILError, match="empty"):
        reconstruct(v, v.grid, tiny_model, device="cpu")
    v.array = np.full(v.array.shape, -1000, np.int16)
    with pytest.raises(MedILError, match="empty"):
        reconstruct(v, v.grid, tiny_model, device="cpu", modality="ct")


def test_cuda_requested_without_gpu(tiny_model, small_mri):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    v = read_volume(small_mri)
    with pytest.raises(MedILError, match="CUDA GPU was asked for but none is available"):
        reconstruct(v, v.grid, tiny_model, device="cuda")


@pytest.mark.gpu
def test_gpu_matches_cpu(tiny_model, small_mri):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    v = read_volume(small_mri)
    target = output_grid(v.grid, spacing=1.0)
    a = reconstruct(v, target, tiny_model, device="cpu")
    b = reconstruct(v, target, tiny_model, device="cuda")
    np.testing.assert_allclose(a.array, b.array, atol=1e-3 * float(np.abs(a.array).max()))


def test_an_output_spilled_to_disk_equals_one_in_ram(tiny_model, small_mri, monkeypatch):
    """Outputs bigger than a share of the limit go tile by tile into a memory-mapped temporary file."""
    from medil_backend.ops import memory

    v = read_volume(small_mri)
    target = output_grid(v.grid, spacing=0.9, orientation="RAS")
    ram = reconstruct(v, target, tiny_model, device="cpu", precision="float32")
    assert not ram.meta["output_on_disk"] and not isinstance(ram.array, np.memmap)
    monkeypatch.setattr(memory, "SPILL_FRACTION", 0.0)
    disk = reconstruct(v, target, tiny_model, device="cpu", precision="float32", max_memory_gb=_just_enough(tiny_model, v, target, (2, 12)))
    assert disk.meta["output_on_disk"] and isinstance(disk.array, np.memmap) and disk.meta["tiles"]["decode"] > 1
    np.testing.assert_allclose(np.asarray(disk.array), ram.array, atol=1e-5 * float(np.abs(ram.array).max()))


def test_an_output_grid_that_misses_the_input_is_refused(tiny_model, small_mri):
    v = read_volume(small_mri)
    lo, hi = v.grid.extent()
    far = output_grid(v.grid, fov=[lo[0] + 1000, hi[0] + 1000, lo[1], hi[1], lo[2], hi[2]])
    with pytest.raises(MedILError, match="does not overlap the input"):
        reconstruct(v, far, tiny_model, device="cpu")


@pytest.mark.parametrize("modality,shift,floor", [("mri", 0.0, 0.0), ("ct", -1500.0, -1024.0)])
def test_outputs_stay_within_physics(tiny_model, small_mri, modality, shift, floor):
    """An MR magnitude (no negative voxel) never comes out negative; CT never below -1024 HU."""
    import torch

    v = read_volume(small_mri)
    v.array = v.array.astype(np.float32) + shift
    with torch.no_grad():  # a decoder that undershoots everywhere
        tiny_model.decoder.head.bias.fill_(-5.0)
    out = reconstruct(v, v.grid, tiny_model, device="cpu", precision="float32", modality=modality)
    assert out.array.min() == pytest.approx(floor)
