"""The architecture registry: every bundled model round-trips (card -> network -> card), and every
option reaches every architecture's runner."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from medil_backend.errors import Cancelled, MedILError
from medil_backend.io import read_volume
from medil_backend.models import BUNDLED_DIR, architecture_of, architectures, export_model, load_model, run_model

BUNDLED = sorted(p.stem for p in BUNDLED_DIR.glob("*.json"))
#: bundled models whose network is built from MONAI (the train extra)
NEEDS_TRAIN_EXTRA = {"conv-baseline-brain-t1"}


def test_every_bundled_architecture_is_registered():
    assert BUNDLED
    names = {json.loads((BUNDLED_DIR / f"{n}.json").read_text())["architecture"] for n in BUNDLED}
    assert names <= set(architectures())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.train) if n in NEEDS_TRAIN_EXTRA else n for n in BUNDLED])
def test_registry_round_trips_every_bundled_model(name, tmp_path):
    model = load_model(name)
    arch = architecture_of(model.net)
    assert arch.name == model.card["architecture"]
    card = {k: v for k, v in model.card.items() if k not in ("name", "architecture", "config", "weights", "sha256", "latent")}
    path = export_model(model.net, tmp_path, "copy", card)
    again = load_model(path)
    assert type(again.net) is type(model.net)
    assert again.card["config"] == model.card["config"] and again.card["latent"] == model.card["latent"]
    a, b = model.net.state_dict(), again.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_architecture_is_a_clear_error(tmp_path):
    card = json.loads((BUNDLED_DIR / "medil-brain-t1.json").read_text())
    card["architecture"] = "TransformerOfTheFuture"
    card["weights"] = "future.safetensors"
    (tmp_path / "future.json").write_text(json.dumps(card))
    (tmp_path / "future.safetensors").write_bytes((BUNDLED_DIR / "medil-brain-t1.safetensors").read_bytes())
    with pytest.raises(MedILError, match="architecture 'TransformerOfTheFuture' is not known"):
        load_model(tmp_path / "future.json")


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
def test_every_option_reaches_the_fixed_grid_runner(small_mri):
    """No option is silently dropped: cancel, the memory limit and the precision reach the baseline too."""
    v = read_volume(small_mri)
    net = load_model("conv-baseline-brain-t1").net
    out = run_model(v, v.grid, net, device="cpu", precision="float32", max_memory_gb=2)
    assert out.meta["precision"] == "float32" and np.isfinite(out.array).all()
    with pytest.raises(MedILError, match="fixed-grid baseline works on the whole volume"):
        run_model(v, v.grid, net, device="cpu", max_memory_gb=0.001)
    token = threading.Event()
    token.set()
    with pytest.raises(Cancelled):
        run_model(v, v.grid, net, device="cpu", cancel=token)


def test_models_json_carries_the_card_essentials_the_panel_shows():
    import json
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "medil_backend", "models", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    models = {m["name"]: m for m in json.loads(proc.stdout)}
    main = models["medil-brain-t1"]
    assert main["role"] == "model" and main["description"] and main["licence"]
    assert main["trained_on"]["volumes"] > 0 and main["held_out_psnr_mask_db"]["recon"] > 30
    assert models["conv-baseline-brain-t1"]["role"] == "comparison" and models["medil-interp-brain-t1"]["role"] == "comparison"
    sys.path.insert(0, str(REPO / "MedILSlicer"))
    from MedILSlicerLib.logic import describeModel, modelLabel

    tip = describeModel(main)
    assert "Held-out quality" in tip and "Licence" in tip and "Trained on" in tip
    assert modelLabel(models["conv-baseline-brain-t1"]).endswith("(comparison only)") and modelLabel(main) == "medil-brain-t1"
    assert "not meant for use" in describeModel(models["conv-baseline-brain-t1"])
