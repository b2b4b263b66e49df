"""``medil batch``: a real Dask LocalCluster over small BIDS trees, folders and manifests of real volumes
(crops of the bundled example): the derivatives tree, the report, failures named, resume, a killed
worker retried, two runs into one folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE, REPO

from medil_backend.batch.derivatives import STATE_DIR, incomplete_reason
from medil_backend.batch.scans import find_scans
from medil_backend.cli import main
from medil_backend.io import read_volume, sidecar_path, write_volume


def _crop(z0: int = 16):
    v = read_volume(EXAMPLE)
    v.array = np.ascontiguousarray(v.array[40:76, 40:76, z0 : z0 + 20])
    v.affine = v.grid.sub_grid((40, 40, z0), (76, 76, z0 + 20)).affine
    return v


@pytest.fixture
def bids(tmp_path):
    """A BIDS dataset: two participants, a session, three formats, and one damaged file."""
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "sub-02" / "ses-1" / "anat").mkdir(parents=True)
    (root / "derivatives" / "old" / "sub-01" / "anat").mkdir(parents=True)  # never read as input
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    write_volume(_crop(), root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    write_volume(_crop(20), root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_run-1_T1w.nrrd")
    write_volume(_crop(24), root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_run-2_T1w.mha")
    (root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_acq-bad_T1w.nii.gz").write_bytes(b"not a volume")
    (root / "sub-01" / "anat" / "sub-01_T1w.json").write_text("{}")  # a BIDS sidecar: not a scan
    return root


GOOD = {
    "sub-01_T1w": "sub-01/anat/sub-01_desc-medilsuperres_T1w.nii.gz",
    "sub-02_ses-1_run-1_T1w": "sub-02/ses-1/anat/sub-02_ses-1_run-1_desc-medilsuperres_T1w.nii.gz",
    "sub-02_ses-1_run-2_T1w": "sub-02/ses-1/anat/sub-02_ses-1_run-2_desc-medilsuperres_T1w.nii.gz",
}
BAD = "sub-02_ses-1_acq-bad_T1w"


def _batch(src, out, *extra):
    return ["batch", "superres", str(src), str(out), "--method", "fast", "--progress", "none", *extra]


def _report(out: Path) -> dict:
    return json.loads((out / "medil_batch_report.json").read_text())


def test_batch_over_a_bids_tree_writes_derivatives_a_report_and_names_the_failure(bids, tmp_path, capsys):
    out = tmp_path / "derivatives"
    assert main(_batch(bids, out, "--workers", "2", "--spacing", "1.5")) == 1  # one scan failed: non-zero
    err = capsys.readouterr().err
    assert "1 of 4 scans were not done" in err and BAD in err and "medil_batch_report.html" in err and "Traceback" not in err
    import SimpleITK as sitk

    from medil_backend.io import from_sitk

    for scan_id, rel in GOOD.items():  # the derivatives tree, every output on the grid asked for, with its sidecar
        path = out / rel
        v = read_volume(path)
        np.testing.assert_allclose(v.grid.spacing, 1.5, atol=1e-5)
        arr, aff = from_sitk(sitk.ReadImage(str(path)))  # and SimpleITK (what Slicer reads) sees the same grid and voxels
        assert np.array_equal(arr, v.array) and np.max(np.abs(aff - v.affine)) < 1e-5, rel
        record = json.loads(sidecar_path(path).read_text())
        assert record["task"] == "superres" and record["batch"]["scan"] == scan_id and record["file_sha256"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "medil"
    assert not list(out.rglob("*acq-bad*desc*")) and not list(out.rglob("*.part*"))  # nothing of the failed scan
    assert not list((out / STATE_DIR / "locks").iterdir())  # every lock released
    report = _report(out)
    assert report["counts"] == {"done": 3, "skipped": 0, "failed": 1, "busy": 0} and report["workers"] == 2
    by_id = {r["id"]: r for r in report["scans"]}
    assert "cannot read" in by_id[BAD]["message"]
    for scan_id in GOOD:
        r = by_id[scan_id]
        assert r["status"] == "done" and r["seconds"] > 0 and r["peak_memory_gb"] > 0.05
        assert r["residual"]["after"] < r["residual"]["before"]  # data consistency, per scan
        assert (out / r["thumbnail"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "medil_batch_report.html").read_text()
    assert page.count("<img ") == 3 and BAD in page and "cannot read" in page


def test_resume_skips_complete_scans_and_redoes_a_half_written_one(bids, tmp_path, capsys):
    (bids / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_acq-bad_T1w.nii.gz").unlink()
    out = tmp_path / "derivatives"
    assert main(_batch(bids, out, "--workers", "1", "--no-thumbnails")) == 0
    paths = {k: out / v for k, v in GOOD.items()}
    key = json.loads(sidecar_path(paths["sub-01_T1w"]).read_text())["batch"]["key"]
    assert all(incomplete_reason([p], key) is None for p in paths.values())
    # an earlier run cut short: one image truncated (its sidecar vouches for another file), one sidecar missing
    data = paths["sub-01_T1w"].read_bytes()
    paths["sub-01_T1w"].write_bytes(data[: len(data) // 2])
    sidecar_path(paths["sub-02_ses-1_run-1_T1w"]).unlink()
    kept = paths["sub-02_ses-1_run-2_T1w"].stat().st_mtime_ns
    capsys.readouterr()
    assert main(_batch(bids, out, "--workers", "1", "--no-thumbnails")) == 1  # outputs there: --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(_batch(bids, out, "--workers", "1", "--no-thumbnails", "--resume")) == 0
    status = {r["id"]: r["status"] for r in _report(out)["scans"]}
    assert status == {"sub-01_T1w": "done", "sub-02_ses-1_run-1_T1w": "done", "sub-02_ses-1_run-2_T1w": "skipped"}
    assert paths["sub-02_ses-1_run-2_T1w"].stat().st_mtime_ns == kept
    assert all(incomplete_reason([p], key) is None for p in paths.values())
    # other settings are another result: everything is redone
    assert main(_batch(bids, out, "--workers", "1", "--no-thumbnails", "--resume", "--iterations", "3")) == 0
    assert {r["status"] for r in _report(out)["scans"]} == {"done"}


def test_a_worker_killed_mid_scan_has_its_scan_run_again(tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_volume(_crop(), folder / "head.nii.gz")
    out = tmp_path / "out"
    lock = out / STATE_DIR / "locks" / "sub-head_scan.lock"
    killed = []

    def kill_first_worker() -> None:  # as the OOM killer would: SIGKILL the worker holding the scan
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            os.kill(owner["pid"], signal.SIGKILL)
            killed.append(owner["pid"])

    watcher = threading.Thread(target=kill_first_worker, daemon=True)
    watcher.start()
    args = ["batch", "superres", str(folder), str(out), "--method", "adapt", "--time-budget", "0.1", "--progress", "none"]
    assert main([*args, "--workers", "1", "--no-thumbnails"]) == 0
    watcher.join(5)
    assert killed, "the scan never started"
    record = _report(out)["scans"][0]
    assert record["status"] == "done" and record["id"] == "sub-head_scan"
    produced = out / "sub-head" / "anat" / "sub-head_desc-medilsuperres_scan.nii.gz"
    assert incomplete_reason([produced], json.loads(sidecar_path(produced).read_text())["batch"]["key"]) is None
    assert not lock.exists()


def test_two_runs_into_one_folder_do_not_corrupt_each_other(bids, tmp_path):
    (bids / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_acq-bad_T1w.nii.gz").unlink()
    out = tmp_path / "shared-out"
    command = [sys.executable, "-m", "medil_backend", *_batch(bids, out, "--workers", "1", "--no-thumbnails", "--overwrite")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in runs]
    codes = [p.returncode for p in runs]
    assert all(c in (0, 1) for c in codes), results  # 1: a scan was held by the other run, and it says so
    for (_, stderr), code in zip(results, codes):
        assert "Traceback" not in stderr
        if code == 1:
            assert "held by another run" in stderr and "--resume" in stderr
    for rel in GOOD.values():  # every scan written once, whole, by one of them
        path = out / rel
        record = json.loads(sidecar_path(path).read_text())
        assert incomplete_reason([path], record["batch"]["key"]) is None
    assert not list(out.rglob("*.part*")) and not list((out / STATE_DIR / "locks").iterdir())
    # and a third run with --resume finds all of it complete
    assert main(_batch(bids, out, "--workers", "1", "--no-thumbnails", "--resume")) == 0
    assert {r["status"] for r in _report(out)["scans"]} == {"skipped"}


def test_folders_and_manifests_give_bids_names_and_participants_can_be_chosen(tmp_path):
    folder = tmp_path / "plain"
    (folder / "site A").mkdir(parents=True)
    write_volume(_crop(), folder / "site A" / "patient-7.nii.gz")
    write_volume(_crop(), folder / "p8.mha")
    scans = find_scans(folder)
    assert sorted(s.subject for s in scans) == ["p8", "patient7"]
    assert scans[0].derivative(tmp_path / "o", "medilreconstruct").name.endswith("_desc-medilreconstruct_scan.nii.gz")
    manifest = tmp_path / "list.csv"
    manifest.write_text("input,participant,session,suffix\nplain/p8.mha,sub-08,ses-2,T2w\nplain/site A/patient-7.nii.gz,07,,T1w\n")
    scans = find_scans(manifest, ["08"])
    assert len(scans) == 1 and scans[0].id == "sub-08_ses-2_T2w" and Path(scans[0].input).is_file()
    rel = scans[0].derivative(tmp_path / "o", "medilsuperres").relative_to(tmp_path / "o")
    assert str(rel) == "sub-08/ses-2/anat/sub-08_ses-2_desc-medilsuperres_T2w.nii.gz"
    js = tmp_path / "list.json"
    js.write_text(json.dumps([{"input": str(folder / "p8.mha")}]))
    assert [s.subject for s in find_scans(js)] == ["p8"]


BAD_BATCH = [
    (lambda t: ["batch", "superres", str(t / "nowhere"), str(t / "o")], "does not exist"),
    (lambda t: ["batch", "superres", str(t / "plain"), str(t / "plain" / "x.nii.gz")], "is a file"),
    (lambda t: ["batch", "superres", str(t / "plain"), str(t / "o"), "--participant-label", "99"], "no scans of participant"),
    (lambda t: ["batch", "superres", str(t / "plain"), str(t / "o"), "--resume", "--overwrite"], "choose one"),
    (lambda t: ["batch", "superres", str(t / "plain"), str(t / "o"), "--samples", "0"], "samples"),
    (lambda t: ["batch", "superres", str(t / "plain"), str(t / "o"), "--device", "tpu"], "device"),
    (lambda t: ["batch", "superres", str(t / "plain"), str(t / "o"), "--scheduler", "slurm"], "dask-jobqueue"),
    (lambda t: ["batch", "superres", str(t / "bad.csv"), str(t / "o")], "unknown columns"),
    (lambda t: ["batch", "superres", str(t / "empty"), str(t / "o")], "holds no volumes"),
    (lambda t: ["batch", "superres", str(t / "plain"), str(t / "o"), "--workers", "0"], "workers"),
    (lambda t: ["batch", "superres", str(t / "plain"), str(t / "o"), "--scheduler", "elsewhere"], "scheduler address"),
]


@pytest.mark.parametrize("make,fragment", BAD_BATCH, ids=[f for _, f in BAD_BATCH])
def test_bad_batch_requests_are_refused_in_one_line_and_write_nothing(tmp_path, capsys, make, fragment):
    pytest.importorskip("distributed")
    if fragment == "dask-jobqueue":
        try:
            import dask_jobqueue  # noqa: F401

            pytest.skip("dask-jobqueue is installed")
        except ImportError:
            pass
    (tmp_path / "plain").mkdir()
    (tmp_path / "empty").mkdir()
    write_volume(_crop(), tmp_path / "plain" / "x.nii.gz")
    (tmp_path / "bad.csv").write_text("input,colour\nx.nii.gz,red\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(make(tmp_path))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("medil: error:")]
    assert code == 1 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_batch_takes_only_tasks_that_read_an_input(capsys):
    with pytest.raises(SystemExit) as e:
        main(["batch", "sample", "in", "out"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_batch_request_is_a_dataclass_that_the_command_line_fills(bids, tmp_path):
    """The batch takes a request, not an argparse namespace: what `medil batch` parses is the same request a Python
    caller builds, and its jobs carry the task's checked options."""
    from medil_backend.batch.command import BatchRequest, plan_jobs
    from medil_backend.cli import build_parser
    from medil_backend.task import get_task

    argv = _batch(bids, tmp_path / "out", "--samples", "1", "--spacing", "2")
    parsed = BatchRequest.from_namespace(build_parser().parse_args(argv))
    built = BatchRequest(
        "superres", str(bids), str(tmp_path / "out"), options={"method": "fast", "samples": 1}, spacing=[2.0], progress="none"
    )
    assert parsed.options["method"] == built.options["method"] == "fast" and parsed.spacing == built.spacing == [2.0]
    for request in (parsed, built):
        jobs, skipped = plan_jobs(request, get_task("superres"), tmp_path / "out")
        assert len(jobs) == 4 and not skipped  # the damaged file too: it fails in its worker, not in the plan
        assert all(j.options["method"] == "fast" and j.options["iterations"] is None for j in jobs)  # the method's own default
    assert (
        plan_jobs(parsed, get_task("superres"), tmp_path / "out")[0][0].key
        == plan_jobs(built, get_task("superres"), tmp_path / "out")[0][0].key
    )


def test_a_worker_loads_each_model_once_for_all_its_scans(bids, tmp_path, monkeypatch):
    """Two scans in one worker process: the model is read and its sha256 checked once, and both scans are done."""
    import medil_backend.models as models
    from medil_backend.batch import worker
    from medil_backend.batch.command import BatchRequest, plan_jobs
    from medil_backend.task import get_task

    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda name=None: loads.append(name) or real(name))
    monkeypatch.setattr(worker, "_MODELS", {})
    request = BatchRequest("reconstruct", str(bids), str(tmp_path / "out"), spacing=[3.0], no_thumbnails=True, progress="none")
    jobs, _ = plan_jobs(request, get_task("reconstruct"), tmp_path / "out")
    records = [worker.run_scan(j) for j in jobs if "bad" not in j.scan.id][:2]
    assert [r["status"] for r in records] == ["done", "done"]
    assert loads == ["medil-brain-t1"]
