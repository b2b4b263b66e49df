import threading

import numpy as np
import pytest

from medil_backend.errors import Cancelled, MedILError
from medil_backend.geometry import output_grid
from medil_backend.io import read_volume
from medil_backend.ops.reconstruct import plan_slabs, reconstruct


@pytest.mark.parametrize("orientation", ["input", "RAS", "aligned"])
def test_slabwise_equals_whole(tiny_model, small_mri, orientation):
    v = read_volume(small_mri)
    target = output_grid(v.grid, spacing=[1.9, 1.3, 2.3], orientation=orientation)
    whole = reconstruct(v, target, tiny_model, device="cpu", slab=10_000)
    assert whole.meta["slab_thickness"] == target.coarsened(tiny_model.factor).shape[whole.meta["slab_axis"]]
    for slab in (1, 4):
        parts = reconstruct(v, target, tiny_model, device="cpu", slab=slab)
        np.testing.assert_allclose(parts.array, whole.array, atol=1e-5 * max(1.0, float(np.abs(whole.array).max())))
    assert whole.grid.same_as(target, atol=0)


def test_slabwise_equals_whole_with_guided_decoder(tiny_config, small_mri):
    """The guide (interpolated input) read by the decoder's finest level is covered by the slab halo."""
    from dataclasses import replace

    import torch

    from medil_backend.nn import MedILAutoencoder

    torch.manual_seed(1)
    net = MedILAutoencoder(replace(tiny_config, guide_decoder=True))
    with torch.no_grad():
        net.decoder.head.weight.normal_(0, 0.05)
        net.decoder.guide.weight.normal_(0, 0.2)
    net.eval()
    v = read_volume(small_mri)
    target = output_grid(v.grid, spacing=[1.1, 0.9, 1.7], orientation="RAS")
    whole = reconstruct(v, target, net, device="cpu", slab=10_000)
    parts = reconstruct(v, target, net, device="cpu", slab=2)
    np.testing.assert_allclose(parts.array, whole.array, atol=1e-5 * max(1.0, float(np.abs(whole.array).max())))
    with pytest.raises(ValueError, match="guide_decoder needs global_skip"):
        MedILAutoencoder(replace(tiny_config, guide_decoder=True, global_skip=False))


def test_memory_limit_picks_thin_slabs_and_refuses_too_big(tiny_model, small_mri):
    v = read_volume(small_mri)
    target = output_grid(v.grid, spacing=0.5)
    axis, thick = plan_slabs(tiny_model, target, budget_bytes=2e9)
    axis2, thin = plan_slabs(tiny_model, target, budget_bytes=1.5e8)
    assert axis == axis2 and 1 <= thin < thick
    with pytest.raises(MedILError, match="too big for the memory limit"):
        reconstruct(v, output_grid(v.grid, spacing=0.05), tiny_model, device="cpu", max_memory_gb=0.01)


def test_progress_and_cancel(tiny_model, small_mri):
    v = read_volume(small_mri)
    target = output_grid(v.grid, spacing=1.0)
    seen = []
    reconstruct(v, target, tiny_model, device="cpu", slab=2, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    token = threading.Event()

    def cancel_after_first(f, m):
        if f > 0:
            token.set()

    with pytest.raises(Cancelled):
        reconstruct(v, target, tiny_model, device="cpu", slab=2, progress=cancel_after_first, cancel=token)


def test_output_in_input_units_and_modality(tiny_model, small_mri):
    import torch

    v = read_volume(small_mri)
    with torch.no_grad():  # silence the decoder: the global skip alone is trilinear interpolation of the input
        tiny_model.decoder.head.weight.zero_()
        tiny_model.decoder.head.bias.zero_()
    out = reconstruct(v, v.grid, tiny_model, device="cpu")
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
    with pytest.raises(MedILError, match="no CUDA GPU"):
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
