"""Adding a task is one spec and one runner: a test-only task ("invert"), registered here and nowhere else, is picked
up by the command line (its subcommand, flags and range checks), by medil batch (planning and a worker's run), by
`medil tasks --json` and by the Slicer panel's task catalog, and writes its output with a provenance sidecar."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import EXAMPLE, REPO

from medil_backend.geometry import Volume
from medil_backend.task import TASKS, ModelRef, Option, Output, Provenance, TaskResult, TaskSpec


def run_invert(ctx, volume, request, model, options) -> TaskResult:
    """The test task's runner: the input's intensities mirrored about their range, times ``gain``."""
    a = np.asarray(volume.array, dtype=np.float32)
    out = Volume(options.gain * (a.max() + a.min() - a), volume.affine, modality=volume.modality)
    provenance = Provenance(task="invert", models=[ModelRef("none", None)], grid=out.grid, device="cpu", precision="float32")
    return TaskResult([Output(out, "output")], provenance, {"gain": options.gain})


INVERT = TaskSpec(
    name="invert",
    help="test only: the input's intensities mirrored about their range",
    needs_input=True,
    model_kind="",
    options=(Option("gain", float, 1.0, "a factor on the result", label="Gain", low=0.0, high=10.0, low_open=True, metavar="G"),),
    runner="test_fourth_task:run_invert",
    label="Invert (test)",
)


@pytest.fixture
def invert(monkeypatch):
    monkeypatch.setitem(TASKS, "invert", INVERT)
    return INVERT


def test_the_command_line_runs_a_task_it_was_never_told_of(invert, tmp_path, capsys):
    from medil_backend.cli import main
    from medil_backend.io import read_volume, sidecar_path

    out = tmp_path / "inv.nii.gz"
    assert main(["invert", str(EXAMPLE), str(out), "--gain", "2"]) == 0
    src, got = read_volume(EXAMPLE), read_volume(out)
    a = np.asarray(src.array, dtype=np.float32)
    np.testing.assert_allclose(got.array, 2 * (a.max() + a.min() - a), rtol=1e-6)
    assert json.loads(sidecar_path(out).read_text())["task"] == "invert"
    assert main(["invert", str(EXAMPLE), str(tmp_path / "x.nii.gz"), "--gain", "0"]) != 0  # the spec's range, no code
    assert "gain" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()


def test_batch_tasks_json_and_the_panel_catalog_take_it(invert, tmp_path):
    import sys

    from medil_backend.batch import worker
    from medil_backend.batch.command import BatchRequest, plan_jobs
    from medil_backend.task import tasks_json

    specs = tasks_json()
    assert "invert" in [t["name"] for t in specs]
    sys.path.insert(0, str(REPO / "MedILSlicer"))
    from MedILSlicerLib.tasks import Catalog

    catalog = Catalog.from_specs(specs)
    assert catalog.by_key("invert").label == "Invert (test)"
    assert catalog.option_arguments("invert", {"gain": 3.0}) == ["--gain", "3.0"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "scan.nii.gz").write_bytes(EXAMPLE.read_bytes())
    jobs, _ = plan_jobs(
        BatchRequest("invert", str(data), str(tmp_path / "out"), options={"gain": 0.5}, no_thumbnails=True), invert, tmp_path / "out"
    )
    (record,) = [worker.run_scan(j) for j in jobs]
    assert record["status"] == "done" and record["outputs"][0].endswith(".nii.gz")
