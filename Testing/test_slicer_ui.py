"""The module's .ui in real Qt (PySide6, offscreen), checked against MedILSlicer.py's own code."""

import ast
import os
import re
import sys

import pytest
from conftest import REPO

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="needs PySide6-Essentials")
from slicer_app import load_ui, qMRMLNodeComboBox  # noqa: E402  (Slicer's custom widgets, stood in for)

UI = REPO / "MedILSlicer" / "Resources" / "UI" / "MedILSlicer.ui"
MODULE = REPO / "MedILSlicer" / "MedILSlicer.py"
ARTIFACTS = REPO / "test-artifacts"


def ui_node_types():
    """objectName -> nodeTypes of every node selector (one node or several) in the .ui (Qt properties Slicer reads)."""
    import xml.etree.ElementTree as ET

    out = {}
    for w in ET.parse(UI).iter("widget"):
        if w.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox"):
            prop = [p for p in w.findall("property") if p.get("name") == "nodeTypes"][0]
            out[w.get("name")] = [s.text for s in prop.iter("string")]
    return out


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


@pytest.fixture(scope="module")
def panel(app):
    return load_ui(UI)


def module_ast():
    return ast.parse(MODULE.read_text())


def parameter_fields():
    """Field name -> default (or None) of the @parameterNodeWrapper class in MedILSlicer.py."""
    tree = module_ast()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            out = {}
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign):
                    out[stmt.target.id] = ast.literal_eval(stmt.value) if stmt.value is not None else None
            return out
    raise AssertionError("no @parameterNodeWrapper class in MedILSlicer.py")


def module_constant(name):
    if name in ("TASKS", "SUPERRES_METHODS"):  # these lists live in MedILSlicerLib/tasks.py; the module imports them
        sys.path.insert(0, str(MODULE.parent))
        from MedILSlicerLib import tasks

        assert "from MedILSlicerLib.tasks import LABELS as TASKS" in MODULE.read_text()
        return tasks.LABELS if name == "TASKS" else tasks.SUPERRES_METHODS  # the .ui's method items: the bundled specs
    for node in module_ast().body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise KeyError(name)


def bound_widgets(panel):
    return {w.property("SlicerParameterName"): w for w in panel.findChildren(QtWidgets.QWidget) if w.property("SlicerParameterName")}


def test_module_file_compiles():
    compile(MODULE.read_text(), str(MODULE), "exec")


def test_every_widget_the_code_uses_exists(panel):
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    names = {w.objectName() for w in panel.findChildren(QtWidgets.QWidget)}
    assert used, "the widget code uses no widgets?"
    assert used <= names, f"missing in the .ui: {sorted(used - names)}"


#: parameters the widget keeps in step with its combo box itself: Slicer's combo-box connector needs a Choice fixed when
#: the module loads, and the backend may publish other methods (MedILSlicerWidget.onMethodChanged)
UNBOUND = {"superresMethod": "superresMethodComboBox"}


def test_parameter_names_match_the_parameter_node(panel):
    fields = parameter_fields()
    bound = bound_widgets(panel)
    assert set(bound) <= set(fields), f"unknown SlicerParameterName: {sorted(set(bound) - set(fields))}"
    assert set(fields) - set(UNBOUND) <= set(bound), f"parameters with no widget: {sorted(set(fields) - set(bound) - set(UNBOUND))}"
    assert not set(UNBOUND) & set(bound)
    names = {w.objectName() for w in panel.findChildren(QtWidgets.QWidget)}
    assert set(UNBOUND.values()) <= names


def test_the_panels_default_time_budget_is_the_backends_for_one_stack(panel):
    """The parameter's default, the constant the panel compares with when stacks are checked, and the .ui's value are
    the backend's one-stack time budget; the several-stack default is the spec's."""
    from medil_backend.methods import TIME_BUDGET_MIN, default_time_budget

    assert parameter_fields()["superresTimeBudget"] == module_constant("ONE_STACK_TIME_BUDGET") == TIME_BUDGET_MIN
    assert panel.findChild(QtWidgets.QDoubleSpinBox, "superresTimeBudgetSpinBox").value() == TIME_BUDGET_MIN
    from medil_backend.task import TASKS

    assert TASKS["superres"].option("time_budget").stacks_default == default_time_budget("adapt", 3, 1) == 0.0


def test_each_option_widget_holds_the_parameter_the_widget_code_reads_for_it(panel):
    """The panel hands the logic its options by the specs' names, reading each from the parameter named after its
    widget (MedILSlicerWidget.taskOptions): every option widget is bound to that parameter (or kept in step with it)."""
    from MedILSlicerLib.tasks import OPTION_WIDGETS, panel_parameter

    fields = parameter_fields()
    widgets = {name: widget.objectName() for name, widget in bound_widgets(panel).items()} | UNBOUND
    for widget in OPTION_WIDGETS.values():
        assert panel_parameter(widget) in fields and widgets[panel_parameter(widget)] == widget


@pytest.mark.parametrize(
    "param,constant",
    [
        ("task", "TASKS"),
        ("spacingPreset", "SPACING_PRESETS"),
        ("orientationMode", "ORIENTATIONS"),
        ("fovMode", "FOV_MODES"),
        ("device", "DEVICES"),
        ("modality", "MODALITIES"),
        ("superresMethod", "SUPERRES_METHODS"),
    ],
)
def test_combo_boxes_offer_the_parameter_choices_and_default(panel, param, constant):
    combo = bound_widgets(panel).get(param) or panel.findChild(QtWidgets.QComboBox, UNBOUND.get(param, ""))
    items = [combo.itemText(i) for i in range(combo.count())]
    assert items == module_constant(constant)
    assert parameter_fields()[param] == items[0]  # the default is the first, pre-selected item


def test_defaults_are_sane(panel):
    fields = parameter_fields()
    bound = bound_widgets(panel)
    for axis in "XYZ":
        spin = bound[f"customSpacing{axis}"]
        assert spin.value() == fields[f"customSpacing{axis}"] == 1.0 and spin.minimum() > 0
    assert bound["maxMemoryGB"].value() == fields["maxMemoryGB"] == 3.0
    assert bound["showIn3D"].isChecked() is False and fields["showIn3D"] is False
    node_types = ui_node_types()
    assert node_types["inputSelector"] == ["vtkMRMLScalarVolumeNode"]
    assert node_types["fovRoiSelector"] == ["vtkMRMLMarkupsROINode"]
    assert node_types["extraStacksSelector"] == ["vtkMRMLScalarVolumeNode"]
    assert set(node_types) == {w.objectName() for w in panel.findChildren(qMRMLNodeComboBox)}
    apply = panel.findChild(QtWidgets.QPushButton, "applyButton")
    assert apply.text() == "Apply" and not apply.isEnabled()  # enabled once an input is chosen


def test_panel_screenshot(panel):
    ARTIFACTS.mkdir(exist_ok=True)
    panel.resize(440, 820)
    panel.show()
    QtWidgets.QApplication.processEvents()
    image = panel.grab()
    path = ARTIFACTS / "MedILSlicer_panel.png"
    assert image.save(str(path))
    assert path.stat().st_size > 1000


def test_the_ui_is_what_tools_gen_ui_writes():
    """The committed .ui is generated (``python tools/gen_ui.py``), never edited by hand: the two agree."""
    import importlib.util
    import xml.dom.minidom

    spec = importlib.util.spec_from_file_location("gen_ui", MODULE.parents[1] / "tools" / "gen_ui.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = xml.dom.minidom.parseString(gen.build()).toprettyxml(indent=" ", encoding="UTF-8").decode()
    assert written == gen.OUT.read_text(), "the .ui differs from what tools/gen_ui.py writes: rerun it"


@pytest.mark.parametrize(
    "param,task,option",
    [
        ("superresSamples", "superres", "samples"),
        ("superresTimeBudget", "superres", "time_budget"),
        ("sampleSeed", "sample", "seed"),
        ("sampleCount", "sample", "n"),
        ("sampleSteps", "sample", "steps"),
    ],
)
def test_the_panels_ranges_are_the_task_specs(panel, param, task, option):
    """One option, one range: the panel's spin box allows what the backend's spec allows, capped only where a Qt spin
    box stops (a signed 32-bit int) or where the spec sets no ceiling; 0 steps is the panel's 'model's default'."""
    from medil_backend.task import TASKS

    spec = TASKS[task].option(option)
    spin = bound_widgets(panel)[param]
    assert spin.minimum() == (0 if param == "sampleSteps" else spec.low)
    if spec.high is None:
        assert spin.maximum() == 100
    else:
        assert spin.maximum() == min(spec.high, 2**31 - 1)
