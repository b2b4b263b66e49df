"""Generate MedILSlicer/Resources/UI/MedILSlicer.ui (Qt Designer XML) from a compact description, and
the task specs bundled with the extension (MedILSlicer/Resources/tasks.json, the backend's ``medil tasks --json``).

Both are committed; rerun this after changing the panel or a task spec: ``python tools/gen_ui.py``.
"""

import json
import sys
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "MedILSlicer" / "Resources" / "UI" / "MedILSlicer.ui"
SPECS = ROOT / "MedILSlicer" / "Resources" / "tasks.json"
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # the bundled specs first: the panel's task list is read from them
    from medil_backend.task import tasks_json

    SPECS.write_text(json.dumps(tasks_json(), indent=1) + "\n", encoding="utf-8")
sys.path.insert(0, str(OUT.parents[2]))
from MedILSlicerLib.tasks import LABELS as TASKS  # noqa: E402  (the one task list)
from MedILSlicerLib.tasks import SUPERRES_METHODS, option_range  # noqa: E402

from medil_backend.methods import TIME_BUDGET_MIN  # noqa: E402  (the panel's default budget: one stack's)

SPACING = ["input", "finest isotropic", "1 mm", "custom"]
ORIENT = ["input", "axial (RAS-aligned)", "like reference"]
FOV = ["input extent", "ROI", "like reference"]
DEVICES = ["auto", "cuda", "cpu"]
MODALITIES = ["auto", "mri", "ct"]


def prop(name, kind, value):
    if kind == "stringlist":
        inner = "".join(f"<string>{escape(v)}</string>" for v in value)
        return f'<property name="{name}"><stringlist>{inner}</stringlist></property>'
    return f'<property name="{name}"><{kind}>{escape(str(value))}</{kind}></property>'


def widget(cls, name, *props, param=None, children=""):
    ps = "".join(props)
    if param:
        ps += prop("SlicerParameterName", "string", param)
    return f'<widget class="{cls}" name="{name}">{ps}{children}</widget>'


def combo(name, items, param=None):
    kids = "".join(f'<item><property name="text"><string>{escape(t)}</string></property></item>' for t in items)
    return widget("QComboBox", name, param=param, children=kids)


def node_combo(name, types, param, none=False, none_text=None, add=False):
    props = [
        prop("nodeTypes", "stringlist", types),
        prop("addEnabled", "bool", str(add).lower()),
        prop("removeEnabled", "bool", "false"),
        prop("noneEnabled", "bool", str(none).lower()),
        prop("renameEnabled", "bool", "true" if add else "false"),
    ]
    if none_text:
        props.append(prop("noneDisplay", "string", none_text))
    return widget("qMRMLNodeComboBox", name, *props, param=param)


def checkable_node_combo(name, types, tooltip):
    """Several nodes at once (Slicer's checkable node selector), read by the module's code (no parameter)."""
    props = [
        prop("nodeTypes", "stringlist", types),
        prop("addEnabled", "bool", "false"),
        prop("removeEnabled", "bool", "false"),
        prop("noneEnabled", "bool", "false"),
        prop("renameEnabled", "bool", "false"),
        prop("toolTip", "string", tooltip),
    ]
    return widget("qMRMLCheckableNodeComboBox", name, *props)


def form(rows):
    items = []
    for r, (label, w) in enumerate(rows):
        if label is None:
            items.append(f'<item row="{r}" column="0" colspan="2">{w}</item>')
        else:
            target = w.split('name="', 1)[1].split('"', 1)[0]
            items.append(
                f'<item row="{r}" column="0"><widget class="QLabel" name="{target}Label">{prop("text", "string", label)}</widget></item>'
            )
            items.append(f'<item row="{r}" column="1">{w}</item>')
    return f'<layout class="QFormLayout">{"".join(items)}</layout>'


def hbox(*ws):
    return '<layout class="QHBoxLayout">' + "".join(f"<item>{w}</item>" for w in ws) + "</layout>"


def collapsible(name, text, rows, collapsed=False):
    return widget(
        "ctkCollapsibleButton", name, prop("text", "string", text), prop("collapsed", "bool", str(collapsed).lower()), children=form(rows)
    )


def spin(name, param, lo, hi, value, suffix=" mm", step=0.1):
    return widget(
        "QDoubleSpinBox",
        name,
        prop("decimals", "number", 3),
        prop("minimum", "double", lo),
        prop("maximum", "double", hi),
        prop("singleStep", "double", step),
        prop("value", "double", value),
        prop("suffix", "string", suffix),
        param=param,
    )


def ispin(name, param, lo, hi, value, tooltip, special=""):
    return widget(
        "QSpinBox",
        name,
        *([prop("specialValueText", "string", special)] if special else []),
        prop("minimum", "number", lo),
        prop("maximum", "number", hi),
        prop("value", "number", value),
        prop("toolTip", "string", tooltip),
        param=param,
    )


def build() -> str:
    custom = widget(
        "QWidget",
        "customSpacingWidget",
        children=hbox(
            spin("customSpacingXSpinBox", "customSpacingX", 0.01, 100, 1.0),
            spin("customSpacingYSpinBox", "customSpacingY", 0.01, 100, 1.0),
            spin("customSpacingZSpinBox", "customSpacingZ", 0.01, 100, 1.0),
        ),
    )
    model_row = widget(
        "QWidget",
        "modelRowWidget",
        children=hbox(
            widget(
                "QComboBox",
                "modelComboBox",
                prop("toolTip", "string", "Models from the registry (bundled, $MEDIL_MODELS, ~/.medil/models)"),
            ),
            widget("QPushButton", "refreshModelsButton", prop("text", "string", "Refresh")),
            widget("QPushButton", "chooseModelFolderButton", prop("text", "string", "Choose a model folder...")),
        ),
    )
    device_row = widget(
        "QWidget",
        "deviceRowWidget",
        children=hbox(combo("deviceComboBox", DEVICES, "device"), widget("QLabel", "deviceLabel", prop("text", "string", "detecting..."))),
    )
    sections = [
        collapsible(
            "inputsCollapsibleButton",
            "Input",
            [
                ("Input volume:", node_combo("inputSelector", ["vtkMRMLScalarVolumeNode"], "inputVolume")),
                ("Task:", combo("taskComboBox", TASKS, "task")),
            ],
        ),
        collapsible(
            "geometryCollapsibleButton",
            "Output geometry",
            [
                ("Spacing:", combo("spacingPresetComboBox", SPACING, "spacingPreset")),
                (None, custom),
                ("Orientation:", combo("orientationComboBox", ORIENT, "orientationMode")),
                (None, node_combo("orientationReferenceSelector", ["vtkMRMLScalarVolumeNode"], "orientationReference", none=True)),
                ("Field of view:", combo("fovComboBox", FOV, "fovMode")),
                (None, node_combo("fovRoiSelector", ["vtkMRMLMarkupsROINode"], "fovRoi", none=True, add=True)),
                (None, node_combo("fovReferenceSelector", ["vtkMRMLScalarVolumeNode"], "fovReference", none=True)),
            ],
        ),
        collapsible(
            "modelCollapsibleButton",
            "Model and device",
            [
                ("Model:", model_row),
                ("Device:", device_row),
                ("Memory limit:", spin("maxMemorySpinBox", "maxMemoryGB", 0.25, 512, 3.0, suffix=" GB", step=0.5)),
            ],
        ),
        collapsible(
            "reconstructOptionsCollapsibleButton",
            "Reconstruct options",
            [
                ("Modality:", combo("modalityComboBox", MODALITIES, "modality")),
            ],
        ),
        collapsible(
            "superresOptionsCollapsibleButton",
            "Super-resolution options",
            [
                # not bound by parameterNodeWrapper: its Choice is fixed when the module loads, and the backend may publish
                # other methods (the widget keeps the parameter and the combo box in step itself)
                ("Method:", combo("superresMethodComboBox", SUPERRES_METHODS)),
                (
                    "Samples:",
                    ispin(
                        "superresSamplesSpinBox",
                        "superresSamples",
                        *option_range("superres", "samples"),
                        1,
                        "K > 1: the output is the mean of K runs, and a second volume holds their per-voxel standard deviation (uncertainty), shown as a colour overlay",
                    ),
                ),
                (
                    "Time budget:",
                    spin(
                        "superresTimeBudgetSpinBox",
                        "superresTimeBudget",
                        *option_range("superres", "time_budget"),
                        TIME_BUDGET_MIN,
                        suffix=" min",
                        step=0.5,
                    ),
                ),
                (
                    "More stacks:",
                    checkable_node_combo(
                        "extraStacksSelector",
                        ["vtkMRMLScalarVolumeNode"],
                        "Other thick-slice stacks of the same anatomy and contrast, in any orientation: the checked ones are "
                        "registered to the input volume and combined with it into one volume, with a coverage map",
                    ),
                ),
            ],
        ),
        collapsible(
            "sampleOptionsCollapsibleButton",
            "Sample options",
            [
                (
                    "Seed:",
                    ispin("sampleSeedSpinBox", "sampleSeed", *option_range("sample", "seed"), 0, "The same seed draws the same volume"),
                ),
                (
                    "Count:",
                    ispin(
                        "sampleCountSpinBox", "sampleCount", *option_range("sample", "n"), 1, "Volumes to draw (seeds seed, seed+1, ...)"
                    ),
                ),
                (
                    "Steps:",
                    ispin(
                        "sampleStepsSpinBox",
                        "sampleSteps",
                        *option_range("sample", "steps", special_low=0),
                        0,
                        "DDIM denoising steps (model's default: the step count in the model's card)",
                        special="model's default",
                    ),
                ),
            ],
        ),
        collapsible(
            "outputsCollapsibleButton",
            "Output",
            [
                (
                    "Output volume:",
                    node_combo(
                        "outputSelector", ["vtkMRMLScalarVolumeNode"], "outputVolume", none=True, none_text="Create new volume", add=True
                    ),
                ),
                (None, widget("QCheckBox", "showIn3DCheckBox", prop("text", "string", "Show in 3D (volume rendering)"), param="showIn3D")),
            ],
        ),
        widget(
            "QPushButton",
            "applyButton",
            prop("enabled", "bool", "false"),
            prop("toolTip", "string", "Run MedIL"),
            prop("text", "string", "Apply"),
        ),
        widget("QProgressBar", "progressBar", prop("value", "number", 0)),
        widget("QPlainTextEdit", "logTextEdit", prop("readOnly", "bool", "true"), prop("maximumBlockCount", "number", 2000)),
    ]
    items = "".join(f"<item>{s}</item>" for s in sections)
    items += '<item><spacer name="verticalSpacer"><property name="orientation"><enum>Qt::Vertical</enum></property></spacer></item>'
    selectors = [
        "inputSelector",
        "extraStacksSelector",
        "orientationReferenceSelector",
        "fovRoiSelector",
        "fovReferenceSelector",
        "outputSelector",
    ]
    connections = "".join(
        f"<connection><sender>MedILSlicer</sender><signal>mrmlSceneChanged(vtkMRMLScene*)</signal><receiver>{s}</receiver>"
        f"<slot>setMRMLScene(vtkMRMLScene*)</slot></connection>"
        for s in selectors
    )
    customwidgets = "".join(
        f"<customwidget><class>{c}</class><extends>{e}</extends><header>{h}</header>{'<container>1</container>' if cont else ''}</customwidget>"
        for c, e, h, cont in [
            ("ctkCollapsibleButton", "QWidget", "ctkCollapsibleButton.h", True),
            ("qMRMLNodeComboBox", "QWidget", "qMRMLNodeComboBox.h", False),
            ("qMRMLCheckableNodeComboBox", "qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox.h", False),
            ("qMRMLWidget", "QWidget", "qMRMLWidget.h", True),
        ]
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<ui version="4.0"><class>MedILSlicer</class>'
        f'<widget class="qMRMLWidget" name="MedILSlicer"><property name="geometry"><rect><x>0</x><y>0</y><width>420</width><height>760</height></rect></property>'
        f'<layout class="QVBoxLayout" name="verticalLayout">{items}</layout></widget>'
        f"<customwidgets>{customwidgets}</customwidgets><resources/><connections>{connections}</connections></ui>\n"
    )


if __name__ == "__main__":
    import xml.dom.minidom

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(xml.dom.minidom.parseString(build()).toprettyxml(indent=" ", encoding="UTF-8").decode())
    print(SPECS)
    print(OUT)
