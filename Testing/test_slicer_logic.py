"""MedILSlicer's Logic against real MRML from the slicer-core wheel (no Slicer application)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, load_node, shared

from medil_backend.geometry import Volume
from medil_backend.io import read_volume, write_volume

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel")
pytestmark = pytest.mark.slicer

sys.path.insert(0, str(REPO / "MedILSlicer"))
from MedILSlicerLib.logic import MedILLogicCore, MedILSlicerError, OutputSpace  # noqa: E402
from MedILSlicerLib.mrml_geometry import ijk_to_ras, numpy_to_vtk_matrix  # noqa: E402


@pytest.fixture
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)


def node_array(node):
    return slicer.util.arrayFromVolume(node).transpose(2, 1, 0)  # MRML arrays are (k, j, i)


def crop_file(rel, box, tmp_path, oblique=False, name="crop.nrrd"):
    v = read_volume(shared(rel))
    lo, hi = np.array(box[0]), np.array(box[1])
    arr = np.ascontiguousarray(v.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    aff = v.grid.sub_grid(lo, hi).affine
    if oblique:
        a = np.deg2rad(23)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        aff[:3, :3] = rot @ aff[:3, :3]
    path = tmp_path / name
    write_volume(Volume(arr, aff), path, dtype=arr.dtype)
    return path


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "medil_backend", *map(str, args), "--progress", "none"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


CASES = [
    ("mri/clinical_t1c_thick_0p78x0p78x6p5mm.nrrd", ((90, 100, 8), (130, 136, 17)), False),  # LPS-stored, flipped axis
    ("ct/head_ct_0p96x0p96x1p5mm.nrrd", ((100, 100, 40), (132, 128, 64)), True),  # oblique
]


@pytest.mark.parametrize("rel,box,oblique", CASES, ids=["lps-flipped", "oblique-ct"])
def test_logic_matches_cli(scene, tmp_path, model_dir, rel, box, oblique):
    src = crop_file(rel, box, tmp_path, oblique)
    node = load_node(scene, src)
    # (the wheel's NRRD reader may store slices in reverse order, with IJKToRAS to match: the same
    # image in world space; an explicit orientation makes the two output grids identical)
    space = OutputSpace(spacing=[1.1, 1.3, 1.7], orientation="LPS")
    out = MedILLogicCore().process("reconstruct", node, space, {"model": "tiny"}, waitForCompletion=True)
    ref_path = tmp_path / "cli.nrrd"
    cli("reconstruct", src, ref_path, "--model", "tiny", "--spacing", 1.1, 1.3, 1.7, "--orientation", "LPS")
    ref = read_volume(ref_path)
    np.testing.assert_allclose(ijk_to_ras(out), ref.affine, atol=1e-5)
    assert tuple(out.GetImageData().GetDimensions()) == ref.shape
    np.testing.assert_allclose(node_array(out), ref.array, atol=1e-4)
    assert out.GetAttribute("MedIL.model") == "tiny"
    assert len(out.GetAttribute("MedIL.modelSha256")) == 64
    assert "AI-generated" in out.GetDescription()
    assert out.GetName().endswith("_medil_reconstruct")


def test_superres_task_matches_cli(scene, tmp_path):
    """The Super-resolve task on a real MRML node of a real thick-slice scan (6.5 mm slices) equals `medil superres`."""
    src = crop_file(*CASES[0][:2], tmp_path)
    node = load_node(scene, src)
    out = MedILLogicCore().process("superres", node, OutputSpace(spacing=[0.8, 0.8, 2.0], orientation="LPS"), {"method": "fast"})
    ref_path = tmp_path / "cli_sr.nrrd"
    cli("superres", src, ref_path, "--spacing", 0.8, 0.8, 2.0, "--orientation", "LPS", "--method", "fast")
    ref = read_volume(ref_path)
    np.testing.assert_allclose(ijk_to_ras(out), ref.affine, atol=1e-5)
    np.testing.assert_allclose(node_array(out), ref.array, atol=1e-3)
    assert out.GetAttribute("MedIL.task") == "superres" and "AI-generated" in out.GetDescription()
    assert out.GetName().endswith("_medil_superres")


def test_superres_samples_give_an_uncertainty_node(scene, tmp_path):
    src = crop_file(*CASES[0][:2], tmp_path)
    node = load_node(scene, src)
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    out = MedILLogicCore().process(
        "superres", node, OutputSpace(spacing=[0.8, 0.8, 3.25]), {"method": "adapt", "samples": 2, "time_budget": 0.1}
    )
    unc = scene.GetNodeByID(out.GetAttribute("MedIL.uncertaintyNodeID"))
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 2
    np.testing.assert_allclose(ijk_to_ras(unc), ijk_to_ras(out), atol=1e-6)
    assert unc.GetImageData().GetDimensions() == out.GetImageData().GetDimensions()
    assert node_array(unc).min() >= 0 and node_array(unc).max() > 0
    assert unc.GetName().endswith("_uncertainty") and "AI-generated" in unc.GetDescription()
    assert unc.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeRainbow"


def _until_preview(logic, job, events):
    deadline = time.time() + 300
    while job.previewNode is None and time.time() < deadline:
        assert logic.poll(job, events.append) is None, "the job finished before its preview was shown"
        time.sleep(0.05)
    assert job.previewNode is not None and any("preview" in e for e in events)
    return job.previewNode


def test_a_superres_preview_is_shown_then_filled_in_place_by_the_full_result(scene, tmp_path):
    """options preview: the quick result appears in a node marked as a preview while the full result is made;
    the full result then fills that same node (its name, no preview mark), and no other node is added."""
    node = load_node(scene, crop_file(*CASES[0][:2], tmp_path))
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    logic, events = MedILLogicCore(), []
    space = OutputSpace(spacing=[0.8, 0.8, 3.25])
    job = logic.process("superres", node, space, {"time_budget": 0.1, "preview": True}, waitForCompletion=False)
    preview = _until_preview(logic, job, events)
    assert preview.GetAttribute("MedIL.preview") == "true" and preview.GetName().endswith("(preview)")
    quick = node_array(preview).copy()
    deadline = time.time() + 300
    out = None
    while out is None and time.time() < deadline:
        out = logic.poll(job, events.append)
        time.sleep(0.05)
    assert out is preview and out.GetAttribute("MedIL.preview") is None and out.GetName().endswith("_medil_superres")
    assert not np.array_equal(node_array(out), quick) and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 1
    kinds = [next(iter(e)) for e in events]
    assert kinds.index("preview") < kinds.index("done")
    # no preview where the result is quick already: fast
    fast = logic.process("superres", node, space, {"method": "fast", "preview": True})
    assert "--preview" not in json.loads(fast.GetAttribute("MedIL.parameters"))["arguments"]


def test_cancel_after_the_preview_keeps_the_preview(scene, tmp_path):
    node = load_node(scene, crop_file(*CASES[0][:2], tmp_path))
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    logic, events = MedILLogicCore(), []
    job = logic.process(
        "superres", node, OutputSpace(spacing=[0.8, 0.8, 3.25]), {"time_budget": 5, "preview": True}, waitForCompletion=False
    )
    preview = _until_preview(logic, job, events)
    logic.cancel(job)
    assert not job.backend.running() and not os.path.exists(job.workdir)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 1
    assert preview.GetAttribute("MedIL.preview") == "true" and "Preview" in preview.GetDescription()
    assert node_array(preview).std() > 0


def test_superres_of_several_stack_nodes_matches_cli_and_adds_a_coverage_node(scene, tmp_path):
    """Three thick-slice stacks as real MRML nodes (from a real 1 mm head, moved between stacks): one
    super-resolved node, as `medil superres STACK1 STACK2 STACK3` makes it, and a coverage node."""
    from conftest import head_stack_files

    paths = head_stack_files(tmp_path)
    nodes = [load_node(scene, p) for p in paths]
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    out = MedILLogicCore().process("superres", nodes, OutputSpace(), {"method": "fast"})
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 2
    ref_path = tmp_path / "cli_ms.nrrd"
    cli("superres", *paths, ref_path, "--method", "fast")
    ref = read_volume(ref_path)
    np.testing.assert_allclose(ijk_to_ras(out), ref.affine, atol=1e-5)
    np.testing.assert_allclose(node_array(out), ref.array, atol=0.01 * float(ref.array.max()))
    cov = scene.GetNodeByID(out.GetAttribute("MedIL.coverageNodeID"))
    assert cov.GetName().endswith("_coverage") and node_array(cov).max() == 3
    assert json.loads(out.GetAttribute("MedIL.parameters"))["stacks"] == [n.GetName() for n in nodes]
    with pytest.raises(MedILSlicerError, match="several stacks are for super-resolution"):
        MedILLogicCore().process("reconstruct", nodes, OutputSpace())


def test_generative_superres_takes_the_chosen_diffusion_model(scene, tmp_path, sampler_dir):
    """The panel's model choice reaches `superres --method cycles` (and only the generative methods)."""
    src = crop_file(*CASES[0][:2], tmp_path)
    node = load_node(scene, src)
    out = MedILLogicCore().process(
        "superres", node, OutputSpace(spacing=[1.6, 1.6, 3.25]), {"method": "cycles", "model": "tiny-ldm", "max_memory": 2}
    )
    parameters = json.loads(out.GetAttribute("MedIL.parameters"))
    arguments = parameters["arguments"]
    assert arguments[arguments.index("--model") + 1] == "tiny-ldm" and arguments[arguments.index("--method") + 1] == "cycles"
    assert parameters["model"] == "tiny-ldm" and out.GetAttribute("MedIL.task") == "superres"
    fast = MedILLogicCore().process("superres", node, OutputSpace(spacing=[1.6, 1.6, 3.25]), {"method": "fast", "model": "tiny-ldm"})
    parameters = json.loads(fast.GetAttribute("MedIL.parameters"))
    assert "--model" not in parameters["arguments"] and parameters["model"] is None


def test_logic_like_reference_is_exact(scene, tmp_path, model_dir):
    src = crop_file(*CASES[0][:2], tmp_path)
    node = load_node(scene, src)
    ref = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(ref)
    ref.SetAndObserveImageData(node.GetImageData())
    aff = np.diag([0.7, -1.3, 2.1, 1.0])
    aff[:3, :3] = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]) @ aff[:3, :3]
    aff[:3, 3] = ijk_to_ras(node)[:3, 3] + [0.5, -0.25, 0.75]  # an odd grid that still meets the input (no overlap is refused)
    ref.SetIJKToRASMatrix(numpy_to_vtk_matrix(aff))
    out = MedILLogicCore().process("reconstruct", node, OutputSpace(like=ref), {"model": "tiny"})
    np.testing.assert_allclose(ijk_to_ras(out), aff, atol=1e-5)
    assert out.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()


def test_parent_linear_transform_is_folded_in(scene, tmp_path, model_dir):
    src = crop_file(*CASES[0][:2], tmp_path)
    node = load_node(scene, src)
    t = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(t)
    m = np.eye(4)
    m[:3, 3] = [5.0, -3.0, 2.5]
    t.SetMatrixTransformToParent(numpy_to_vtk_matrix(m))
    node.SetAndObserveTransformNodeID(t.GetID())
    out = MedILLogicCore().process("reconstruct", node, OutputSpace(), {"model": "tiny"})  # default: the input's own (world) grid
    np.testing.assert_allclose(ijk_to_ras(out), m @ ijk_to_ras(node), atol=1e-5)


def test_nonlinear_transform_refused(scene, tmp_path, model_dir):
    import vtk

    node = load_node(scene, crop_file(*CASES[0][:2], tmp_path))
    t = slicer.vtkMRMLTransformNode()
    scene.AddNode(t)
    tps = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p in ([0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]):
        src.InsertNextPoint(p)
        dst.InsertNextPoint([p[0] + 1, p[1], p[2] + 0.5])
    tps.SetSourceLandmarks(src)
    tps.SetTargetLandmarks(dst)
    tps.SetBasisToR()
    t.SetAndObserveTransformToParent(tps)
    node.SetAndObserveTransformNodeID(t.GetID())
    with pytest.raises(MedILSlicerError, match="Harden transform"):
        MedILLogicCore().process("reconstruct", node, OutputSpace(), {"model": "tiny"})


def test_roi_field_of_view(scene, tmp_path, model_dir):
    node = load_node(scene, crop_file(*CASES[0][:2], tmp_path))
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    lo, hi = read_volume(tmp_path / "crop.nrrd").grid.extent()
    centre = (lo + hi) / 2
    roi.SetXYZ(*centre)
    roi.SetRadiusXYZ(6.0, 5.0, 9.0)
    out = MedILLogicCore().process("reconstruct", node, OutputSpace(spacing=[1.0], orientation="axial", fov=roi), {"model": "tiny"})
    assert out.GetImageData().GetDimensions() == (12, 10, 18)
    np.testing.assert_allclose(ijk_to_ras(out)[:3, :3], np.eye(3), atol=1e-9)


def test_backend_error_reaches_the_user_and_leaves_no_node(scene, tmp_path, model_dir):
    node = load_node(scene, crop_file(*CASES[0][:2], tmp_path))
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(MedILSlicerError, match="unknown model"):
        MedILLogicCore().process("reconstruct", node, OutputSpace(), {"model": "no-such-model"})
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before


@pytest.mark.parametrize(
    "task, options, inputs, words",
    [
        ("superres", {"timeBudgetMin": 1.0}, 1, "superres takes no option 'timeBudgetMin'; its options are method, samples"),
        ("reconstruct", {"method": "fast"}, 1, "reconstruct takes no option 'method'"),
        ("sample", {"count": 2}, 0, "sample takes no option 'count'"),
        ("superres", {"uncertainty": "/tmp/u.nrrd"}, 1, "superres takes no option 'uncertainty'"),  # the module names its files
        ("sample", {}, 1, "sample takes no input volume"),
        ("superres", {}, 0, "superres needs an input volume"),
    ],
)
def test_the_logic_takes_the_specs_option_names_and_no_others(scene, tmp_path, task, options, inputs, words):
    """process(task, inputs, space, options): the options by the names the task's spec publishes (and its run
    context's, and model); a name from elsewhere (the old timeBudgetMin, count) is refused before any work."""
    node = load_node(scene, crop_file(*CASES[0][:2], tmp_path))
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(MedILSlicerError, match=re.escape(words)):
        MedILLogicCore().process(task, [node] * inputs, OutputSpace(), options)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before


def test_cancel_kills_the_process_tree_and_leaves_nothing(scene, tmp_path, model_dir):
    node = load_node(scene, crop_file(*CASES[0][:2], tmp_path))
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    logic = MedILLogicCore()
    job = logic.process("reconstruct", node, OutputSpace(spacing=[0.12]), {"model": "tiny"}, waitForCompletion=False)
    events = []
    deadline = time.time() + 120
    while not any("progress" in e for e in events) and time.time() < deadline:
        assert logic.poll(job, events.append) is None, "the job finished before it could be cancelled"
        time.sleep(0.05)
    assert any("progress" in e for e in events)
    pid = job.backend.pid
    logic.cancel(job)
    assert not job.backend.running()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no process of the job's group is left
    assert not os.path.exists(job.workdir)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before
    with pytest.raises(MedILSlicerError, match="cancelled"):
        logic.finish(job)


def test_batch_script_with_slicer_core(tmp_path, model_dir):
    src = crop_file(*CASES[1][:2], tmp_path)
    out = tmp_path / "batch_out.nrrd"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "MedILSlicer/Scripts/medil_batch.py"),
            "--input",
            str(src),
            "--output",
            str(out),
            "--spacing",
            "1.5",
            "--model",
            "tiny",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    v, r = read_volume(src), read_volume(out)
    np.testing.assert_allclose(r.grid.spacing, 1.5, atol=1e-5)
    assert r.grid.orientation_code == v.grid.orientation_code
    lo_in, hi_in = v.grid.extent()
    lo, hi = r.grid.extent()
    assert np.all(lo <= lo_in + 1e-4) and np.all(hi >= hi_in - 1e-4)
    # marked AI-generated as the medil command marks its outputs: in the file and in a JSON sidecar
    import json

    import SimpleITK as sitk

    assert sitk.ReadImage(str(out)).GetMetaData("MedIL.aiGenerated") == "true"
    side = json.loads((tmp_path / "batch_out.json").read_text())
    assert side["AIGenerated"] is True and side["model"] == "tiny" and side["model_sha256"] and side["task"] == "reconstruct"
    # a user mistake: clear message, non-zero status, no output
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "MedILSlicer/Scripts/medil_batch.py"),
            "--input",
            str(tmp_path / "missing.nrrd"),
            "--output",
            str(tmp_path / "x.nrrd"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr
    assert not (tmp_path / "x.nrrd").exists()


def test_batch_script_hands_a_folder_to_medil_batch(tmp_path, small_mri):
    """``Slicer --python-script medil_batch.py`` with a folder: the backend's ``medil batch`` writes a
    BIDS-derivatives tree and its report, as the command does for a researcher."""
    import json

    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in ("a1.nii.gz", "b2.nii.gz"):
        (folder / name).write_bytes(small_mri.read_bytes())
    out = tmp_path / "derivatives"
    script = [sys.executable, str(REPO / "MedILSlicer/Scripts/medil_batch.py"), "--input", str(folder), "--output", str(out)]
    proc = subprocess.run(script + ["--task", "superres", "--method", "fast"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "batch superres" in proc.stderr
    for label in ("a1", "b2"):
        path = out / f"sub-{label}" / "anat" / f"sub-{label}_desc-medilsuperres_scan.nii.gz"
        assert read_volume(path).grid.spacing.max() < 3.0 and json.loads(path.with_name(path.name[:-7] + ".json").read_text())["batch"]
    report = json.loads((out / "medil_batch_report.json").read_text())
    assert report["counts"]["done"] == 2 and report["task"] == "superres"
    again = subprocess.run(script + ["--task", "superres", "--method", "fast", "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads((out / "medil_batch_report.json").read_text())["counts"]["skipped"] == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_batch_script_stops_its_backend_and_removes_its_files(small_mri, tmp_path, model_dir, sig):
    """The backend runs in its own session (so the panel can kill its tree): a batch script that is
    interrupted must stop it and delete the temporary copy of the input itself."""
    work = tmp_path / "tmp"
    work.mkdir()
    out = tmp_path / "out.nrrd"
    cmd = [sys.executable, str(REPO / "MedILSlicer/Scripts/medil_batch.py"), "--input", str(small_mri), "--output", str(out)]
    proc = subprocess.Popen(
        cmd + ["--spacing", "0.3", "--model", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(work)},
    )
    deadline = time.time() + 120
    backend = []
    while time.time() < deadline and not backend:  # wait until the backend runs on the temporary copy
        time.sleep(0.2)
        backend = [p for p in _processes_mentioning(str(work)) if "medil_backend" in p[1]]
    assert backend, proc.communicate(timeout=30)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err
    time.sleep(0.5)
    assert _processes_mentioning(str(work)) == []
    assert os.listdir(work) == [] and not out.exists()


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(pid), cmdline))
    return found


def test_sample_task_needs_no_input_node(scene, tmp_path, sampler_dir):
    """The Sample task on real MRML: no input node, the field of view from a Markups ROI, one node per seed."""
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(2.0, -3.0, 1.0)
    roi.SetSize(30.0, 24.0, 18.0)
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    nodes = MedILLogicCore().process(
        "sample", None, OutputSpace(spacing=[2.5], orientation="LPS", fov=roi), {"model": "tiny-ldm", "seed": 11, "n": 2, "steps": 2}
    )
    assert [n.GetName() for n in nodes] == ["tiny-ldm_seed11", "tiny-ldm_seed12"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 2
    for n, seed in zip(nodes, (11, 12)):
        assert n.GetAttribute("MedIL.aiGenerated") == "true" and n.GetAttribute("MedIL.seed") == str(seed)
        assert n.GetAttribute("MedIL.task") == "sample" and len(n.GetAttribute("MedIL.modelSha256")) == 64
        assert n.GetAttribute("MedIL.autoencoder") == "tiny-gen"
        np.testing.assert_allclose(n.GetSpacing(), 2.5, atol=1e-5)
        affine = ijk_to_ras(n)
        corners = np.array([[(0, d - 1)[b] for d, b in zip(n.GetImageData().GetDimensions(), bits)] + [1] for bits in np.ndindex(2, 2, 2)])
        world = corners @ affine.T
        assert np.all(world[:, :3].min(0) >= np.array([2 - 15, -3 - 12, 1 - 9]) - 2.5)  # covers the ROI, no more than a voxel beyond
        assert np.all(world[:, :3].max(0) <= np.array([2 + 15, -3 + 12, 1 + 9]) + 2.5)
    assert not np.array_equal(node_array(nodes[0]), node_array(nodes[1]))


def test_sample_like_a_reference_node_is_exact_and_failure_leaves_nothing(scene, tmp_path, sampler_dir):
    from medil_backend.geometry import Grid, affine_from_parts

    ref = Volume(np.zeros((14, 12, 10), np.float32), affine_from_parts([1.7, 2.2, 2.9], np.diag([-1.0, -1.0, 1.0]), [12.0, 9.0, -13.0]))
    write_volume(ref, tmp_path / "ref.nrrd")
    node = load_node(scene, tmp_path / "ref.nrrd")
    (out,) = MedILLogicCore().process("sample", None, OutputSpace(like=node), {"model": "tiny-ldm"})
    assert np.allclose(ijk_to_ras(out), ijk_to_ras(node), atol=1e-5)
    assert out.GetAttribute("MedIL.steps") == "2"  # no step count given: the model card's
    assert Grid(out.GetImageData().GetDimensions(), ijk_to_ras(out)).shape == (14, 12, 10)
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(MedILSlicerError, match="does not sample"):
        MedILLogicCore().process("sample", None, OutputSpace(), {"model": "tiny-gen", "steps": 1})
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before


def test_model_list_job_answers_in_the_background(sampler_dir):
    """The panel's model discovery: a background process polled from a timer, never a wait in the GUI thread."""
    from MedILSlicerLib.logic import ModelListJob

    job = ModelListJob()
    t0 = time.monotonic()
    first = job.poll()  # returns at once, whatever the backend is doing
    assert time.monotonic() - t0 < 0.5
    models = first
    while models is None:
        time.sleep(0.05)
        models = job.poll()
    names = {m["name"]: m for m in models}
    assert {"tiny-ldm", "tiny-gen", "medil-brain-t1"} <= set(names) and names["tiny-ldm"]["tasks"] == [
        "sample",
        "superres",
    ]  # its architecture's tasks (the registry)


def test_model_list_job_reports_a_broken_backend(tmp_path):
    from MedILSlicerLib.logic import MedILSlicerError, ModelListJob

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'No module named medil_backend' >&2\nexit 1\n")
    fake.chmod(0o755)
    job = ModelListJob(python=str(fake))
    with pytest.raises(MedILSlicerError, match="medil_backend"):
        while job.poll() is None:
            time.sleep(0.05)


def test_provenance_survives_saving_and_reloading_the_scene(scene, tmp_path):
    """Slicer's Save writes the scene (node attributes and description) and each volume through its storage node;
    re-loading the scene gives back the output with every MedIL attribute."""
    src = crop_file(*CASES[0][:2], tmp_path)
    node = load_node(scene, src)
    out = MedILLogicCore().process("superres", node, OutputSpace(spacing=[1.6, 1.6, 3.25]), {"method": "fast"})
    attributes = {name: out.GetAttribute(name) for name in out.GetAttributeNames() if name.startswith("MedIL.")}
    assert attributes["MedIL.aiGenerated"] == "true" and len(attributes) >= 6
    for n in (node, out):
        n.AddDefaultStorageNode()
        n.GetStorageNode().SetFileName(str(tmp_path / f"{n.GetName()}.nrrd"))
        assert n.GetStorageNode().WriteData(n) == 1
    scene.SetRootDirectory(str(tmp_path))
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit() == 1
    again = slicer.vtkMRMLScene()
    again.SetRootDirectory(str(tmp_path))
    again.SetURL(str(tmp_path / "scene.mrml"))
    assert again.Connect() == 1
    back = again.GetFirstNodeByName(out.GetName())
    assert {name: back.GetAttribute(name) for name in attributes} == attributes
    assert back.GetDescription() == out.GetDescription() and "AI-generated" in back.GetDescription()
    np.testing.assert_allclose(node_array(back), node_array(out), atol=1e-6)
