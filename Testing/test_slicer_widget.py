"""The module's widget code (MedILSlicer.py) driven as a user drives it: real Qt widgets from the real
.ui (PySide6, offscreen), a real MRML scene with real volume nodes, the real backend in a real
process; Slicer's application layer rebuilt by ``slicer_app``. Apply -> progress -> result node;
Cancel (process tree gone, no node, no file); a failing job (message shown, panel usable); the
model list filled in the background; a screenshot of the panel."""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
import types

import numpy as np
import pytest
from conftest import EXAMPLE, REPO, load_node

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6.QtWidgets", reason="needs PySide6-Essentials")
slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel")
import slicer_app  # noqa: E402

ARTIFACTS = REPO / "test-artifacts"


def pump(app, until, timeout=300.0, widget=None):
    """Run Qt's event loop (the panel's timers poll the backend) until ``until()`` or the timeout."""
    t0 = time.monotonic()
    while not until():
        if time.monotonic() - t0 > timeout:
            log = raw_ui(widget).logTextEdit.toPlainText()[-2000:] if widget is not None else ""
            raise AssertionError(f"still waiting after {timeout} s; the panel's log: {log}")
        app.processEvents()
        time.sleep(0.02)


def raw_ui(widget):
    """The panel's widgets as PySide6 objects (the module itself sees them as PythonQt shows them)."""
    return types.SimpleNamespace(**{k: slicer_app.raw(v) for k, v in vars(widget.ui).items()})


def backend_files():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "medil-slicer-*")))


@pytest.fixture
def slot_errors(monkeypatch):
    """Exceptions raised in Qt slots (PySide6 hands them to sys.excepthook; Slicer prints them as tracebacks)."""
    errors = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, exc, tb: errors.append(exc))
    return errors


@pytest.fixture
def panel(tmp_path, slot_errors):
    scene = slicer.vtkMRMLScene()
    app, module, dialogs, views = slicer_app.install(scene)
    node = load_node(scene, EXAMPLE)
    node.SetName("t1_thick")
    module.MedILSlicer(slicer_app.QtWidgets.QWidget())  # registers the sample data once Slicer has started
    widget = module.MedILSlicerWidget()
    widget.setup()
    pump(app, lambda: widget.ui.modelComboBox.count > 0, timeout=120)  # models listed by a background process
    yield app, widget, scene, node, dialogs, views
    widget.cleanup()


def volumes(scene):
    return [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]


def test_opening_the_panel_raises_nothing_in_its_slots(panel, slot_errors):
    """Slicer's connectGui clears the task combo box (currentTextChanged('')) before refilling it: the panel's slots
    must take the empty text (they raised KeyError: '' on every open)."""
    app, widget, scene, node, dialogs, views = panel
    widget.exit()
    widget.enter()  # each time the module is entered, connectGui runs again
    app.processEvents()
    assert slot_errors == [], [repr(e) for e in slot_errors]
    tips = [raw_ui(widget).taskComboBox.itemData(i, slicer_app.QtCore.Qt.ToolTipRole) for i in range(raw_ui(widget).taskComboBox.count())]
    assert all(tips), tips  # the tooltips survive the refill


def test_the_modules_own_self_test_runs(panel, slot_errors):
    """MedILSlicerTest, as Slicer's Reload and Test runs it (runTest), on the real scene and the real backend."""
    app, widget, scene, node, dialogs, views = panel
    module = sys.modules["MedILSlicer"]
    import slicer as slicer_module

    before = slicer_module.mrmlScene
    tester = module.MedILSlicerTest()
    tester.runTest()
    assert dialogs.delayed.count("Test passed") == 2, dialogs.delayed
    assert slicer_module.mrmlScene is before and slot_errors == []


def test_the_self_test_without_torch_logs_one_line_and_runs_nothing(panel, monkeypatch, caplog):
    import importlib.util
    import logging

    app, widget, scene, node, dialogs, views = panel
    module = sys.modules["MedILSlicer"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    before = len(volumes(scene))
    with caplog.at_level(logging.INFO):
        module.MedILSlicerTest().runTest()
    lines = [r.getMessage() for r in caplog.records if "MedIL self-test" in r.getMessage()]
    assert len(lines) == 1 and "PyTorch is not installed" in lines[0]
    assert len(volumes(scene)) == before and "Test passed" not in dialogs.delayed


def test_the_panel_opens_on_the_task_that_suits_the_input(panel):
    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    assert ui.taskComboBox.currentText() == "Super-resolve" and widget._parameterNode.task == "Super-resolve"  # 2 x 2 x 3 mm
    assert ui.superresMethodComboBox.currentText() == "adapt"
    tips = [ui.taskComboBox.itemData(i, slicer_app.QtCore.Qt.ToolTipRole) for i in range(ui.taskComboBox.count())]
    assert all(t and ("min" in t or " s " in t) for t in tips), tips  # what each task is for, and how long it takes
    iso = load_node(scene, EXAMPLE)
    iso.SetSpacing(2.0, 2.0, 2.0)
    ui.inputSelector.setCurrentNode(iso)
    assert ui.taskComboBox.currentText() == "Reconstruct / resample"
    ui.taskComboBox.setCurrentText("Sample")  # takes no input: a new input does not take the panel away from it
    ui.inputSelector.setCurrentNode(node)
    assert ui.taskComboBox.currentText() == "Sample"


def test_panel_fills_from_the_scene_and_the_backend(panel):
    app, widget, scene, node, dialogs, views = panel
    ui, module = raw_ui(widget), sys.modules[type(widget).__module__]
    assert widget._parameterNode.inputVolume.GetID() == node.GetID() and ui.inputSelector.currentNode() is node
    assert ui.applyButton.isEnabled() and ui.applyButton.text() == "Apply"
    labels = [ui.modelComboBox.itemText(i) for i in range(ui.modelComboBox.count())]
    assert labels[0] == module.DEFAULT_MODEL_LABEL and ui.modelComboBox.currentIndex() == 0 and not ui.modelComboBox.itemData(0)
    assert labels.index("medil-brain-t1") < labels.index("medil-brain-t1-gen") and "(comparison only)" in labels[-1]
    tips = [ui.modelComboBox.itemData(i, slicer_app.QtCore.Qt.ToolTipRole) for i in range(ui.modelComboBox.count())]
    assert all(t and "Tasks:" in t for t in tips[1:]) and "default" in tips[0]
    pump(app, lambda: widget._deviceJob is None, timeout=120)  # the backend's own torch answers in the background
    assert ui.deviceLabel.text().startswith("detected: ") and "torch" not in sys.modules["MedILSlicer"].__dict__
    assert [s for s, _ in slicer.app.connections] == ["startupCompleted()"]
    ui.taskComboBox.setCurrentText("Super-resolve")  # the panel shows each task's own options
    assert widget._parameterNode.task == "Super-resolve"
    assert not ui.superresOptionsCollapsibleButton.isHidden() and ui.sampleOptionsCollapsibleButton.isHidden()
    assert not ui.modelComboBox.isEnabled()  # adapt needs no model ...
    ui.superresMethodComboBox.setCurrentText("cycles")
    assert ui.modelComboBox.isEnabled() and widget._parameterNode.superresMethod == "cycles"  # ... cycles a diffusion model
    ui.taskComboBox.setCurrentText("Sample")
    assert ui.outputsCollapsibleButton.isHidden() and not ui.sampleOptionsCollapsibleButton.isHidden()


def test_the_panel_takes_its_tasks_and_methods_from_the_backends_specs(panel):
    """The backend's ``medil tasks --json`` drives the panel: a method the backend adds appears in the panel,
    takes a model if the spec says so, and each option's tooltip is its published help."""
    import json

    from MedILSlicerLib import tasks as panel_tasks

    from medil_backend.task import TASKS, tasks_json

    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    assert ui.superresTimeBudgetSpinBox.toolTip() == TASKS["superres"].option("time_budget").help
    assert ui.sampleCountSpinBox.toolTip() == TASKS["sample"].option("n").help
    specs = json.loads(json.dumps(tasks_json()))
    superres = next(s for s in specs if s["name"] == "superres")
    next(o for o in superres["options"] if o["name"] == "method")["choices"].append("newmethod")
    superres["model_when"]["method"].append("newmethod")
    try:
        widget.applyTaskSpecs(specs)
        ui.taskComboBox.setCurrentText("Super-resolve")
        methods = [ui.superresMethodComboBox.itemText(i) for i in range(ui.superresMethodComboBox.count())]
        assert methods == ["adapt", "fast", "inverse", "cycles", "newmethod"] and ui.superresMethodComboBox.currentText() == "adapt"
        assert not ui.modelComboBox.isEnabled()
        ui.superresMethodComboBox.setCurrentText("newmethod")
        assert ui.modelComboBox.isEnabled()
        assert widget._parameterNode.superresMethod == "newmethod"  # the parameter the logic is given follows the backend's list
        widget._parameterNode.superresMethod = "fast"  # and the combo box follows the parameter (a scene loaded, a script)
        assert ui.superresMethodComboBox.currentText() == "fast"
    finally:
        widget.applyTaskSpecs(panel_tasks.read_specs())
    assert [ui.superresMethodComboBox.itemText(i) for i in range(ui.superresMethodComboBox.count())] == list(
        TASKS["superres"].option("method").choices
    )


def test_apply_runs_the_backend_and_adds_a_new_node_each_time(panel):
    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    ui.taskComboBox.setCurrentText("Reconstruct / resample")  # the thick example opens on Super-resolve
    ui.spacingPresetComboBox.setCurrentText("custom")
    for axis in "XYZ":
        getattr(ui, f"customSpacing{axis}SpinBox").setValue(4.0)
    before = len(volumes(scene))
    progress = []
    ui.progressBar.valueChanged.connect(progress.append)
    ui.applyButton.click()
    assert ui.applyButton.text() == "Cancel"
    pump(app, lambda: ui.applyButton.text() == "Apply", widget=widget)
    assert not dialogs.errors, dialogs.errors
    out = volumes(scene)[-1]
    assert len(volumes(scene)) == before + 1 and out is not node and out.GetAttribute("MedIL.task") == "reconstruct"
    np.testing.assert_allclose(out.GetSpacing(), 4.0, atol=1e-5)
    log = ui.logTextEdit.toPlainText()
    assert progress and max(progress) == 100 and "wrote" in log
    assert "done: " in log and " mm" in log and '"done"' not in log  # the backend's summary in words, not its JSON
    assert widget._parameterNode.outputVolume is None and ui.outputSelector.currentNode() is None  # next Apply: a new node
    assert views[0][0] == "layers" and views[0][1]["foreground"] is out
    ui.applyButton.click()
    pump(app, lambda: ui.applyButton.text() == "Apply")
    assert len(volumes(scene)) == before + 2  # the first result is still there
    # choosing an earlier result as the output asks before replacing it; "Cancel" there changes nothing
    ui.outputSelector.setCurrentNode(out)
    dialogs.answer = False
    ui.applyButton.click()
    assert "holds an earlier MedIL result" in dialogs.questions[-1] and ui.applyButton.text() == "Apply"


def test_several_stacks_checked_in_the_panel_become_one_volume_its_uncertainty_and_coverage(panel, tmp_path):
    """Super-resolve with "More stacks" checked: the input volume and the checked stacks (real MRML nodes of one
    real head, moved between stacks) go to the backend together; the result, its uncertainty (two networks)
    and its coverage map come back as nodes."""
    from conftest import head_stack_files

    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    stacks = [load_node(scene, p) for p in head_stack_files(tmp_path)]
    ui.inputSelector.setCurrentNode(stacks[0])
    assert ui.taskComboBox.currentText() == "Super-resolve" and ui.extraStacksSelector.isVisibleTo(widget.parent)
    for n in (stacks[0], stacks[1], stacks[2]):  # the input itself, checked too, is not counted twice
        ui.extraStacksSelector.setCheckState(n, slicer_app.QtCore.Qt.Checked)
    assert [n.GetName() for n in widget.checkedStacks()] == ["stack1", "stack2"]
    ui.superresMethodComboBox.setCurrentText("adapt")
    ui.superresSamplesSpinBox.setValue(2)
    ui.superresTimeBudgetSpinBox.setValue(0.1)
    before = len(volumes(scene))
    ui.applyButton.click()
    pump(app, lambda: ui.applyButton.text() == "Apply", widget=widget)
    assert not dialogs.errors, dialogs.errors
    assert "combining 3 stacks: stack0, stack1, stack2" in ui.logTextEdit.toPlainText()
    new = volumes(scene)[before:]
    assert len(new) == 3, [n.GetName() for n in new]
    out = next(n for n in new if n.GetAttribute("MedIL.task") == "superres")
    cov = scene.GetNodeByID(out.GetAttribute("MedIL.coverageNodeID"))
    unc = scene.GetNodeByID(out.GetAttribute("MedIL.uncertaintyNodeID"))
    assert cov is not None and unc is not None and cov.GetName().endswith("_coverage")
    import json

    params = json.loads(out.GetAttribute("MedIL.parameters"))
    assert params["stacks"] == ["stack0", "stack1", "stack2"] and params["samples"] == 2  # adapt: the default method
    assert "--coverage" in params["arguments"] and "--uncertainty" in params["arguments"]
    ui.taskComboBox.setCurrentText("Reconstruct / resample")  # one input only: the stack selector goes
    assert not ui.extraStacksSelector.isVisibleTo(widget.parent)


def test_the_time_budget_follows_the_stack_count_while_it_shows_a_default(panel, tmp_path):
    """Checking more stacks turns the one-stack default budget (3 minutes) into the several-stack default the spec
    publishes (0: the pre-trained network alone); several samples or unchecking the stacks turn it back; a budget
    the user set stays as it is. The panel's default is the backend's."""
    from conftest import head_stack_files

    from medil_backend.methods import TIME_BUDGET_MIN
    from medil_backend.task import TASKS

    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    stacks = [load_node(scene, p) for p in head_stack_files(tmp_path, size=24)]
    ui.inputSelector.setCurrentNode(stacks[0])
    budget = ui.superresTimeBudgetSpinBox
    several = TASKS["superres"].option("time_budget").stacks_default
    assert budget.value() == TIME_BUDGET_MIN and several == 0.0
    ui.extraStacksSelector.setCheckState(stacks[1], slicer_app.QtCore.Qt.Checked)
    assert budget.value() == several and widget._parameterNode.superresTimeBudget == several
    ui.superresSamplesSpinBox.setValue(2)  # several samples need networks that differ: a budget
    assert budget.value() == TIME_BUDGET_MIN
    ui.superresSamplesSpinBox.setValue(1)
    assert budget.value() == several
    ui.extraStacksSelector.setCheckState(stacks[1], slicer_app.QtCore.Qt.Unchecked)
    assert budget.value() == TIME_BUDGET_MIN
    budget.setValue(1.5)  # the user's own budget is kept either way
    ui.extraStacksSelector.setCheckState(stacks[2], slicer_app.QtCore.Qt.Checked)
    assert budget.value() == 1.5
    ui.extraStacksSelector.setCheckState(stacks[2], slicer_app.QtCore.Qt.Unchecked)
    assert budget.value() == 1.5


def test_cancel_stops_the_backend_and_leaves_nothing(panel):
    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    ui.taskComboBox.setCurrentText("Reconstruct / resample")  # the thick example opens on Super-resolve
    ui.spacingPresetComboBox.setCurrentText("1 mm")
    before, files = len(volumes(scene)), backend_files()
    ui.applyButton.click()
    job = widget._job
    pump(app, lambda: job.backend.process is not None and job.backend.running(), timeout=30)
    pump(app, lambda: ui.progressBar.value() > 0 or "encod" in ui.logTextEdit.toPlainText().lower(), timeout=60)
    ui.applyButton.click()  # Cancel
    assert ui.applyButton.text() == "Apply" and widget._job is None
    pump(app, lambda: job.backend.process.poll() is not None, timeout=10)
    assert len(volumes(scene)) == before and backend_files() == files
    assert "cancelled" in ui.logTextEdit.toPlainText() and not dialogs.errors


def test_super_resolution_shows_its_preview_first_and_the_full_result_replaces_it_in_place(panel):
    """Super-resolve (adapt with a time budget): the quick result is in the slice views as soon as it exists, in a
    node marked as a preview; the full result then fills that node, and the views are not moved again. A run
    cancelled after its preview keeps the preview."""
    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    assert ui.taskComboBox.currentText() == "Super-resolve"  # the thick example
    ui.superresTimeBudgetSpinBox.setValue(0.1)
    before = len(volumes(scene))
    ui.applyButton.click()
    job = widget._job
    pump(app, lambda: "preview in" in ui.logTextEdit.toPlainText(), timeout=300, widget=widget)
    preview = job.previewNode
    assert preview.GetAttribute("MedIL.preview") == "true" and views[-1][1]["foreground"] is preview
    shown = len(views)
    pump(app, lambda: ui.applyButton.text() == "Apply", timeout=300, widget=widget)
    assert not dialogs.errors, dialogs.errors
    out = volumes(scene)[-1]
    assert out is preview and out.GetAttribute("MedIL.preview") is None and len(volumes(scene)) == before + 1
    assert "in place of its preview" in ui.logTextEdit.toPlainText() and len(views) == shown  # the views stay
    ui.superresTimeBudgetSpinBox.setValue(5.0)
    ui.applyButton.click()
    job = widget._job
    pump(app, lambda: job.previewNode is not None, timeout=300, widget=widget)
    ui.applyButton.click()  # Cancel
    assert ui.applyButton.text() == "Apply" and len(volumes(scene)) == before + 2
    assert f"the preview {job.previewNode.GetName()} stays" in ui.logTextEdit.toPlainText() and not dialogs.errors


def test_a_failing_job_shows_its_message_and_the_panel_stays_usable(panel):
    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    ui.taskComboBox.setCurrentText("Reconstruct / resample")  # the thick example opens on Super-resolve
    ui.spacingPresetComboBox.setCurrentText("custom")
    for axis in "XYZ":
        getattr(ui, f"customSpacing{axis}SpinBox").setValue(0.05)  # far too many voxels for the memory limit
    ui.maxMemorySpinBox.setValue(0.5)
    before = len(volumes(scene))
    ui.applyButton.click()
    pump(app, lambda: ui.applyButton.text() == "Apply")
    assert len(dialogs.errors) == 1 and "memory" in dialogs.errors[0].lower() and "Traceback" not in dialogs.errors[0]
    assert len(volumes(scene)) == before and ui.applyButton.isEnabled()
    for axis in "XYZ":  # the user follows the message
        getattr(ui, f"customSpacing{axis}SpinBox").setValue(4.0)
    ui.maxMemorySpinBox.setValue(3.0)
    ui.applyButton.click()
    assert ui.applyButton.text() == "Cancel"
    pump(app, lambda: ui.applyButton.text() == "Apply")
    assert len(volumes(scene)) == before + 1 and len(dialogs.errors) == 1, (dialogs.errors, ui.logTextEdit.toPlainText())


def screenshot(app, widget, name: str) -> None:
    """The panel as drawn, saved in test-artifacts (``*_live.png``); ``MEDIL_UPDATE_SCREENSHOT=1`` refreshes docs/``name``."""
    top = widget.parent
    top.resize(460, 900)
    top.show()
    pump(app, lambda: True)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name.replace(".png", "_live.png")
    assert top.grab().save(str(path)) and path.stat().st_size > 5000
    if os.environ.get("MEDIL_UPDATE_SCREENSHOT"):
        path.replace(REPO / "docs" / name)


def test_panel_screenshot_with_the_model_list_filled(panel):
    """The README's picture of the panel, made from the real widgets with the backend's model list."""
    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    ui.spacingPresetComboBox.setCurrentText("1 mm")
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findData("medil-brain-t1"))
    assert ui.modelComboBox.currentText() == "medil-brain-t1"
    screenshot(app, widget, "MedILSlicer_panel.png")


def _slice_views(scene_nodes, size: int = 300):
    """Slicer's conventional layout, drawn from real MRML nodes' voxels and IJK-to-RAS matrices: axial (red),
    sagittal (yellow) and coronal (green) planes through the centre of each node, one row per node."""
    from MedILSlicerLib.mrml_geometry import ijk_to_ras

    from medil_backend.geometry import Volume
    from medil_backend.preview import _plane, _window

    QtGui = slicer_app.QtGui
    rows = []
    for node in scene_nodes:
        v = Volume(slicer.util.arrayFromVolume(node).transpose(2, 1, 0).astype(np.float32), ijk_to_ras(node))
        window, pixel = _window(v), float(max(np.ptp(np.array(v.grid.extent()), axis=0))) / size
        rows.append([(_plane(v, axis, pixel, window), colour) for axis, colour in ((2, "#f34a33"), (0, "#edd54c"), (1, "#6eb04b"))])
    image = QtGui.QImage(3 * (size + 6), len(rows) * (size + 26), QtGui.QImage.Format_RGB32)
    image.fill(QtGui.QColor("black"))
    painter = QtGui.QPainter(image)
    for r, (row, node) in enumerate(zip(rows, scene_nodes)):
        for c, (plane, colour) in enumerate(row):
            x, y = c * (size + 6), r * (size + 26)
            painter.fillRect(x, y, size + 6, 20, QtGui.QColor(colour))
            painter.setPen(QtGui.QColor("black"))
            painter.drawText(x + 4, y + 15, f"{('Axial', 'Sagittal', 'Coronal')[c]}: {node.GetName()}")
            gray = np.ascontiguousarray(plane)
            q = QtGui.QImage(gray.data, gray.shape[1], gray.shape[0], gray.shape[1], QtGui.QImage.Format_Grayscale8)
            painter.drawImage(QtCore_rect(x + 3, y + 23, size, size), q)
    painter.end()
    return image


def QtCore_rect(x, y, w, h):
    return slicer_app.QtCore.QRect(x, y, w, h)


def test_panel_screenshot_with_a_super_resolved_result_in_the_slice_views(panel):
    """docs/MedILSlicer_result.png: the panel after Super-resolve ran on the thick example, beside the slice views
    of the result and its input (drawn from the MRML nodes). Refresh: MEDIL_UPDATE_SCREENSHOT=1 python -m pytest
    Testing/test_slicer_widget.py -k screenshot."""
    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    assert ui.taskComboBox.currentText() == "Super-resolve"
    ui.superresMethodComboBox.setCurrentText("fast")  # seconds; adapt's picture would take minutes
    ui.spacingPresetComboBox.setCurrentText("finest isotropic")
    ui.applyButton.click()
    pump(app, lambda: ui.applyButton.text() == "Apply", widget=widget)
    assert not dialogs.errors, dialogs.errors
    out = volumes(scene)[-1]
    assert out.GetAttribute("MedIL.task") == "superres" and views[-1][0] == "layers"
    top = widget.parent
    top.resize(460, 900)
    top.show()
    pump(app, lambda: True)
    panel_image = top.grab().toImage()
    views_image = _slice_views([out, node])
    QtGui = slicer_app.QtGui
    composed = QtGui.QImage(
        panel_image.width() + views_image.width() + 8, max(panel_image.height(), views_image.height()), QtGui.QImage.Format_RGB32
    )
    composed.fill(QtGui.QColor("#202020"))
    painter = QtGui.QPainter(composed)
    painter.drawImage(0, 0, panel_image)
    painter.drawImage(panel_image.width() + 8, 0, views_image)
    painter.end()
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "MedILSlicer_result_live.png"
    assert composed.save(str(path)) and path.stat().st_size > 20000
    if os.environ.get("MEDIL_UPDATE_SCREENSHOT"):
        path.replace(REPO / "docs" / "MedILSlicer_result.png")


def test_sample_task_draws_a_volume_from_the_panel_and_renders_it(panel):
    """The Sample task as a user runs it: no input needed, geometry from the panel, the step count the model's
    own unless set; each sample a new node named with its seed, in the slice views and rendered in 3D. The README's
    picture of the Sample panel is taken here."""
    app, widget, scene, node, dialogs, views = panel
    ui = raw_ui(widget)
    ui.taskComboBox.setCurrentText("Sample")
    assert ui.inputSelector.isHidden() and "model's default space" in ui.geometryCollapsibleButton.text
    ui.inputSelector.setCurrentNode(None)  # a sample needs no input volume
    assert ui.applyButton.isEnabled()
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findData("medil-brain-t1-ldm"))
    assert ui.sampleStepsSpinBox.text() == "model's default" and widget._parameterNode.sampleSteps == 0
    ui.spacingPresetComboBox.setCurrentText("1 mm")  # as a user would draw a head
    ui.sampleSeedSpinBox.setValue(3)
    screenshot(app, widget, "MedILSlicer_sample_panel.png")
    ui.sampleStepsSpinBox.setValue(2)  # a quick, coarse draw for the test
    ui.spacingPresetComboBox.setCurrentText("custom")
    for axis in "XYZ":
        getattr(ui, f"customSpacing{axis}SpinBox").setValue(8.0)
    before = len(volumes(scene))
    ui.applyButton.click()
    assert ui.applyButton.text() == "Cancel"
    pump(app, lambda: ui.applyButton.text() == "Apply", widget=widget)
    assert not dialogs.errors, dialogs.errors
    out = volumes(scene)[-1]
    assert len(volumes(scene)) == before + 1 and out.GetName() == "medil-brain-t1-ldm_seed3"
    assert out.GetAttribute("MedIL.aiGenerated") == "true" and out.GetAttribute("MedIL.steps") == "2"
    np.testing.assert_allclose(out.GetSpacing(), 8.0, atol=1e-5)
    assert ("render", out.GetName(), True) in views
