"""MedIL: super-resolve, resample/reconstruct and sample volumes onto any grid with MedIL models.

Module / parameter node / Widget / Logic / Test, as in Slicer's scripted-module template. The
computing happens in ``medil_backend``, run as a separate process by
``MedILSlicerLib.logic.MedILLogicCore`` (which also serves batch scripts and the tests that run
without the application).
"""

import os
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from MedILSlicerLib.logic import (  # noqa: E402
    DeviceJob,
    MedILLogicCore,
    MedILSlicerError,
    ModelListJob,
    OutputSpace,
    describeModel,
    listTasks,
    modelLabel,
)
from MedILSlicerLib.tasks import LABELS as TASKS  # noqa: E402
from MedILSlicerLib.tasks import (  # noqa: E402
    OPTION_WIDGETS,
    catalog,
    option_range,
    panel_parameter,
    suggested_task,
    task_by_key,
    task_by_label,
    use_specs,
)

#: Choices shown in the panel (parameter values; the .ui lists the same texts).
SPACING_PRESETS = ["input", "finest isotropic", "1 mm", "custom"]
ORIENTATIONS = ["input", "axial (RAS-aligned)", "like reference"]
FOV_MODES = ["input extent", "ROI", "like reference"]
DEVICES = ["auto", "cuda", "cpu"]
MODALITIES = ["auto", "mri", "ct"]
#: the backend's time budget for one stack when none is given (``medil_backend.methods.TIME_BUDGET_MIN``; a test checks
#: they agree): the panel's default
ONE_STACK_TIME_BUDGET = 3.0
DEFAULT_MODEL_LABEL = "default (by modality and task)"
#: the model list's order by card role: models, then generative autoencoders (latent spaces), then comparisons
MODEL_ROLE_ORDER = {"model": 0, "generative": 1, "comparison": 2}


#
# Module
#


class MedILSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedIL"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedIL for 3D Slicer developers (MedIL project)"]
        self.parent.helpText = (
            "Resolution-free imaging: super-resolve thick-slice scans (adapt: a network adapted to the scan; or "
            "several stacks combined), resample or reconstruct any volume through a MedIL autoencoder, or sample "
            "AI-generated volumes, onto any output spacing, orientation and field of view. Outputs are AI-generated "
            "and carry their provenance as node attributes."
        )
        self.parent.acknowledgementText = (
            "Builds on MedIL (implicit latent spaces for arbitrary-resolution medical images) and the Local Texture Estimator."
        )
        # the MedIL sample in the Sample Data module, once every module is loaded
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    import SampleData
    from MedILSlicerLib import sampledata

    sampledata.register(SampleData.SampleDataLogic)


#
# Parameter node
#


@parameterNodeWrapper
class MedILSlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    task: Annotated[str, Choice(TASKS)] = "Reconstruct / resample"
    spacingPreset: Annotated[str, Choice(SPACING_PRESETS)] = "input"
    customSpacingX: Annotated[float, WithinRange(0.01, 100.0)] = 1.0
    customSpacingY: Annotated[float, WithinRange(0.01, 100.0)] = 1.0
    customSpacingZ: Annotated[float, WithinRange(0.01, 100.0)] = 1.0
    orientationMode: Annotated[str, Choice(ORIENTATIONS)] = "input"
    orientationReference: vtkMRMLScalarVolumeNode
    fovMode: Annotated[str, Choice(FOV_MODES)] = "input extent"
    fovRoi: vtkMRMLMarkupsROINode
    fovReference: vtkMRMLScalarVolumeNode
    modality: Annotated[str, Choice(MODALITIES)] = "auto"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    maxMemoryGB: Annotated[float, WithinRange(0.25, 512.0)] = 3.0
    outputVolume: vtkMRMLScalarVolumeNode
    showIn3D: bool = False
    superresMethod: str = "adapt"  # any method the backend publishes (not bound to the combo box by connectGui: see onMethodChanged)
    # the ranges are the task specs' (option_range: capped where a Qt spin box stops)
    superresSamples: Annotated[int, WithinRange(*option_range("superres", "samples"))] = 1
    # 0: adapt's prior alone; with several stacks checked (one sample) the panel shows their default, the spec's stacks_default
    superresTimeBudget: Annotated[float, WithinRange(*option_range("superres", "time_budget"))] = 3.0  # ONE_STACK_TIME_BUDGET
    sampleSeed: Annotated[int, WithinRange(*option_range("sample", "seed"))] = 0
    sampleCount: Annotated[int, WithinRange(*option_range("sample", "n"))] = 1
    sampleSteps: Annotated[int, WithinRange(*option_range("sample", "steps", special_low=0))] = 0  # 0: the model's own (its card)


def describeDone(event: dict) -> str:
    """The backend's closing summary (``medil ... --progress json``) as a line or two for the panel's log."""
    parts = []
    if event.get("shape"):
        spacing = event.get("spacing") or []
        parts.append(
            "x".join(str(n) for n in event["shape"]) + (" voxels of " + " x ".join(f"{v:.3g}" for v in spacing) + " mm" if spacing else "")
        )
    if isinstance(event.get("seconds"), (int, float)):
        parts.append(f"{event['seconds']:.0f} s")
    if event.get("method"):
        parts.append(f"method {event['method']}")
    if event.get("stacks"):
        parts.append(f"{event['stacks']} stacks")
    lines = ["done: " + ", ".join(parts) if parts else "done"]
    if event.get("modality_guess"):
        lines.append(str(event["modality_guess"]))
    return "\n".join(lines)


def outputSpaceFromParameters(p) -> OutputSpace:
    """Translate the panel's parameters into an :class:`OutputSpace`."""
    spacing = {"input": "input", "finest isotropic": "finest", "1 mm": "1mm"}.get(
        p.spacingPreset, [p.customSpacingX, p.customSpacingY, p.customSpacingZ]
    )
    orientation = {"input": "input", "axial (RAS-aligned)": "axial"}.get(p.orientationMode, p.orientationReference)
    if p.orientationMode == "like reference" and p.orientationReference is None:
        raise MedILSlicerError("choose the reference volume whose orientation the output takes")
    fov = None
    if p.fovMode == "ROI":
        if p.fovRoi is None:
            raise MedILSlicerError("choose the ROI that sets the output's field of view")
        fov = p.fovRoi
    elif p.fovMode == "like reference":
        if p.fovReference is None:
            raise MedILSlicerError("choose the reference volume that sets the output's field of view")
        fov = p.fovReference
    return OutputSpace(spacing=spacing, orientation=orientation, fov=fov)


#
# Widget
#


class MedILSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedILSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedILSlicerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.chooseModelFolderButton.clicked.connect(self.onChooseModelFolder)
        self.ui.refreshModelsButton.clicked.connect(self.refreshModels)
        self.showTaskHints()
        self.ui.taskComboBox.currentTextChanged.connect(self.updateTaskOptions)
        self.ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)
        self.ui.superresMethodComboBox.currentTextChanged.connect(self.onMethodChanged)
        self.ui.spacingPresetComboBox.currentTextChanged.connect(self.updateGeometryOptions)
        self.ui.orientationComboBox.currentTextChanged.connect(self.updateGeometryOptions)
        self.ui.fovComboBox.currentTextChanged.connect(self.updateGeometryOptions)
        self.ui.extraStacksSelector.checkedNodesChanged.connect(self.onStacksChanged)
        self._budgetFollowsStacks = False  # the time budget shows the several-stack default because stacks were checked
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onPoll)

        self.initializeParameterNode()
        self.ui.deviceLabel.text = "detecting..."
        try:  # the backend's own PyTorch says what it sees: the panel never imports torch (seconds, and maybe not installed)
            self._deviceJob = DeviceJob(self.logic.python)
        except OSError as exc:
            self._deviceJob = None
            self.ui.deviceLabel.text = f"backend not available ({exc})"
        self.refreshModels()
        self.onInputChanged()
        self.updateTaskOptions()
        self.updateGeometryOptions()

    def cleanup(self) -> None:
        # stop polling first: a timer that fired after this would poll a cancelled job
        for timer in (self._timer, getattr(self, "_modelTimer", None)):
            if timer is not None:
                timer.stop()
        if self._job is not None:
            self.logic.cancel(self._job)
            self._job = None
        for name in ("_modelJob", "_deviceJob"):
            if getattr(self, name, None) is not None:
                getattr(self, name).cancel()
                setattr(self, name, None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Slicer's connectGui clears and refills every bound combo box from its Choice: the task tooltips set
            # before are gone, so they are set again after it
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.showTaskHints()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._showMethod()
        self.onStacksChanged()  # the number of samples too (read here, once the parameter holds the spin box's value)
        self._checkCanApply()

    def currentTask(self):
        """The task the panel shows, or None while its list is refilled (Slicer's connector clears the combo box first,
        and it reads '' until refilled)."""
        try:
            return task_by_label(self.ui.taskComboBox.currentText)
        except KeyError:
            return None

    def onMethodChanged(self, text: str) -> None:
        """The method combo box (filled from the backend's specs) writes the parameter itself."""
        p = self._parameterNode
        if text and p is not None and p.superresMethod != text:
            p.superresMethod = text
        self.updateTaskOptions()

    def _showMethod(self) -> None:
        """The parameter's method shown in the combo box, where the backend publishes it."""
        combo, p = self.ui.superresMethodComboBox, self._parameterNode
        if p is not None and combo.currentText != p.superresMethod and combo.findText(p.superresMethod) >= 0:
            combo.setCurrentText(p.superresMethod)

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._job is not None:
            return
        try:
            task = task_by_label(self._parameterNode.task) if self._parameterNode else None
        except KeyError:  # a label the backend's specs no longer publish
            task = None
        ok = bool(task and task.available and (self._parameterNode.inputVolume or not task.needs_input))
        self.ui.applyButton.enabled = ok
        self.ui.applyButton.toolTip = "Run MedIL" if ok else "Select an input volume (and an available task)"

    def onInputChanged(self, *args) -> None:
        """A thick-slice input opens the panel on Super-resolve (adapt), an isotropic one on Reconstruct /
        resample; the Sample task, which takes no input, is left as it is."""
        node, task = self.ui.inputSelector.currentNode(), self.currentTask()
        if node is None or task is None or task.key == "sample":
            return
        self.ui.taskComboBox.setCurrentText(task_by_key(suggested_task(node.GetSpacing())).label)

    def updateTaskOptions(self, *args) -> None:
        task = self.currentTask()
        if task is None:  # the task list is being refilled: its options follow when a task shows again
            return
        key = task.key
        self.ui.reconstructOptionsCollapsibleButton.visible = key in ("reconstruct", "superres")
        self.ui.superresOptionsCollapsibleButton.visible = key == "superres"
        self.ui.sampleOptionsCollapsibleButton.visible = key == "sample"
        self.ui.outputsCollapsibleButton.visible = key != "sample"  # each sample is a new node, named with its seed
        # a sample has no input: the input volume is not asked for, and "input" in the geometry means the model's space
        self.ui.inputSelector.visible = self.ui.inputSelectorLabel.visible = key != "sample"
        self.ui.geometryCollapsibleButton.text = (
            "Output geometry ('input': the model's default space)" if key == "sample" else "Output geometry"
        )
        # super-resolution adapts to the scan itself, except its generative methods, which take a diffusion model
        self.ui.modelComboBox.enabled = catalog().uses_model(key, {"method": self.ui.superresMethodComboBox.currentText})
        # several stacks of one anatomy, where the backend's super-resolution takes them
        several = key == "superres" and task_by_key("superres").max_inputs > 1
        self.ui.extraStacksSelector.visible = self.ui.extraStacksSelectorLabel.visible = several
        self._checkCanApply()

    def taskOptions(self, task: str) -> dict:
        """The values the panel holds for ``task``'s options, by the names its spec declares (the logic's options)."""
        p = self._parameterNode
        return {name: getattr(p, panel_parameter(widget)) for (t, name), widget in OPTION_WIDGETS.items() if t == task}

    def onStacksChanged(self, *args) -> None:
        """The time budget follows the number of stacks while it shows a default: checking stacks (one sample) turns
        the one-stack default into theirs (the spec's ``stacks_default``: the pre-trained network alone), and
        unchecking them, or asking for several samples, turns it back; a budget the user set is kept."""
        p = self._parameterNode
        stacks_default = catalog().option("superres", "time_budget").get("stacks_default")
        if p is None or stacks_default is None:
            return
        several = bool(self.checkedStacks()) and p.superresSamples == 1
        if several and p.superresTimeBudget == ONE_STACK_TIME_BUDGET:
            p.superresTimeBudget = float(stacks_default)
            self._budgetFollowsStacks = True
        elif not several and self._budgetFollowsStacks and p.superresTimeBudget == float(stacks_default):
            p.superresTimeBudget = ONE_STACK_TIME_BUDGET
            self._budgetFollowsStacks = False

    def checkedStacks(self) -> list:
        """The other stacks checked under "More stacks" (the input volume itself left out)."""
        p = self._parameterNode
        return [n for n in self.ui.extraStacksSelector.checkedNodes() if n is not None and (p is None or n != p.inputVolume)]

    def updateGeometryOptions(self, *args) -> None:
        self.ui.customSpacingWidget.visible = self.ui.spacingPresetComboBox.currentText == "custom"
        self.ui.orientationReferenceSelector.visible = self.ui.orientationComboBox.currentText == "like reference"
        self.ui.fovRoiSelector.visible = self.ui.fovComboBox.currentText == "ROI"
        self.ui.fovReferenceSelector.visible = self.ui.fovComboBox.currentText == "like reference"

    def refreshModels(self) -> None:
        """Ask the backend for its models in a background process; the list fills when it answers (Slicer never waits)."""
        if getattr(self, "_modelJob", None) is not None:
            self._modelJob.cancel()
        try:
            self._modelJob = ModelListJob(self.logic.python)
        except OSError as exc:
            self.log(f"MedIL backend not available: {exc}")
            return
        self.ui.refreshModelsButton.enabled = False
        self.ui.modelComboBox.toolTip = "Looking for models..."
        if getattr(self, "_modelTimer", None) is None:
            self._modelTimer = qt.QTimer()
            self._modelTimer.setInterval(100)
            self._modelTimer.timeout.connect(self._pollModels)
        self._modelTimer.start()

    def _pollDevice(self) -> None:
        job = getattr(self, "_deviceJob", None)
        if job is None:
            return
        try:
            info = job.poll()
        except Exception as exc:  # no PyTorch in the backend's interpreter: Apply offers to install it
            self._deviceJob = None
            self.ui.deviceLabel.text = f"PyTorch not available to the backend ({exc})"
            return
        if info is not None:
            self._deviceJob = None
            self.ui.deviceLabel.text = "detected: " + info["label"]

    def _pollModels(self) -> None:
        """The background queries (the models, the device): each fills its part of the panel when it answers."""
        self._pollDevice()
        if self._modelJob is None:
            if self._deviceJob is None:
                self._modelTimer.stop()
            return
        try:
            models = self._modelJob.poll()
        except Exception as exc:  # backend missing or broken: say so; Apply offers to install it
            self._modelJob = None
            self.ui.refreshModelsButton.enabled = True
            self.log(f"MedIL backend not available: {exc}")
            return
        if models is None:
            return
        self._modelJob = None
        self.ui.refreshModelsButton.enabled = True
        self.fillModels(models)
        try:  # the backend answered: its own task specs replace the bundled copy
            self.applyTaskSpecs(listTasks(self.logic.python))
        except Exception as exc:
            self.log(f"MedIL task list not read from the backend (the bundled one is used): {exc}")

    def showTaskHints(self) -> None:
        """Each task's tooltip: what it is good for and how long it takes on a CPU (its spec's help)."""
        for index in range(self.ui.taskComboBox.count):
            try:
                hint = task_by_label(self.ui.taskComboBox.itemText(index)).hint
            except KeyError:
                continue
            self.ui.taskComboBox.setItemData(index, hint, qt.Qt.ToolTipRole)
        for (task, name), widget in OPTION_WIDGETS.items():  # each option's tooltip is its published help
            try:
                getattr(self.ui, widget).toolTip = catalog().option(task, name).get("help", "")
            except KeyError:
                continue

    def applyTaskSpecs(self, specs: list) -> None:
        """Use the task specs the backend publishes (``medil tasks --json``): task hints, super-resolution's
        methods and which of them take a model come from them from now on."""
        tasks = use_specs(specs)
        self.showTaskHints()
        combo, current = self.ui.superresMethodComboBox, self.ui.superresMethodComboBox.currentText
        methods = tasks.choices("superres", "method")
        if [combo.itemText(i) for i in range(combo.count)] != methods:
            was = combo.blockSignals(True)
            combo.clear()
            for m in methods:
                combo.addItem(m)
            combo.setCurrentText(current if current in methods else methods[0])
            combo.blockSignals(was)
            self.onMethodChanged(combo.currentText)
        self.updateTaskOptions()

    def fillModels(self, models: list) -> None:
        combo = self.ui.modelComboBox
        current = combo.currentData
        combo.clear()
        self._modelTasks = {m["name"]: list(m.get("tasks", ["reconstruct"])) for m in models}
        # first the backend's own choice (by the input's modality, or the task's default model), then the models
        # (comparison ones last and marked); each item's tooltip is its card's essentials; the text is the label,
        # the item data the registry name the backend takes
        combo.addItem(DEFAULT_MODEL_LABEL, "")
        combo.setItemData(0, "The default model for the input's modality (reconstruction) or for the task", qt.Qt.ToolTipRole)
        for m in sorted(models, key=lambda m: MODEL_ROLE_ORDER.get(m.get("role"), 1)):
            combo.addItem(modelLabel(m), m["name"])
            combo.setItemData(combo.count - 1, describeModel(m), qt.Qt.ToolTipRole)
        combo.toolTip = "Models from the registry (bundled, $MEDIL_MODELS, ~/.medil/models)"
        if current:
            index = combo.findData(current)
            if index >= 0:
                combo.setCurrentIndex(index)

    def onChooseModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, "Choose a folder of MedIL models (.safetensors + .json)")
        if folder:
            paths = [p for p in os.environ.get("MEDIL_MODELS", "").split(os.pathsep) if p]
            os.environ["MEDIL_MODELS"] = os.pathsep.join([folder] + [p for p in paths if p != folder])
            self.refreshModels()

    def log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onEvent(self, event: dict) -> None:
        if "progress" in event:
            self.ui.progressBar.value = int(100 * event["progress"])
            self.ui.progressBar.format = f"{event.get('message', '')} %p%"
        elif "log" in event:
            self.log(event["log"])
        elif event.get("done"):
            self.log(describeDone(event))
        elif "preview" in event and self._job is not None and self._job.previewNode is not None:
            # the quick result, in the views at once; the full result later fills the same node (the views stay)
            node = self._job.previewNode
            self.log(f"preview in {node.GetName()}: the quick result (the pre-trained network alone); the full result replaces it")
            slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, foreground=node, foregroundOpacity=0.5, fit=True)

    def onApplyButton(self) -> None:
        if self._job is not None:
            preview = self._job.previewNode
            self.logic.cancel(self._job)
            self._finishRun(
                f"cancelled; the preview {preview.GetName()} stays" if preview is not None else "cancelled; no output was created"
            )
            return
        if not self.logic.ensureDependencies():
            return
        if self.ui.modelComboBox.count == 0:  # the backend was just installed: list its models (in the background)
            self.refreshModels()
        p = self._parameterNode
        target = p.outputVolume
        if (
            target is not None
            and target.GetAttribute("MedIL.task")
            and not slicer.util.confirmOkCancelDisplay(f"'{target.GetName()}' holds an earlier MedIL result. Replace it?")
        ):
            return
        task = task_by_label(p.task).key
        chosen = self.ui.modelComboBox.currentData or None
        # sampling and generative super-resolution need a diffusion model: a reconstruction model chosen for
        # another task means the backend's default one
        sampler = chosen if chosen and "sample" in getattr(self, "_modelTasks", {}).get(chosen, []) else None
        try:
            space = outputSpaceFromParameters(p)
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            options = {**self.taskOptions(task), "device": p.device, "max_memory": p.maxMemoryGB}
            if "preview" in catalog().option_names(task):  # the quick result first, where the task makes one
                options["preview"] = True
            options["model"] = sampler if task_by_key(task).model_kind == "diffusion" else chosen
            inputs = [p.inputVolume] if task_by_key(task).needs_input else []
            stacks = self.checkedStacks() if task_by_key(task).max_inputs > 1 else []
            if stacks:
                inputs += stacks
                self.log(f"combining {len(inputs)} stacks: " + ", ".join(n.GetName() for n in inputs))
            target = p.outputVolume if inputs else None
            self._job = self.logic.process(task, inputs, space, options, outputNode=target, waitForCompletion=False)
        except MedILSlicerError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.applyButton.text = "Cancel"
        self.ui.applyButton.enabled = True
        self._timer.start()

    def onPoll(self) -> None:
        try:
            node = self.logic.poll(self._job, self.onEvent)
        except MedILSlicerError as exc:
            self._finishRun(str(exc), error=True)
            return
        if node is None:
            return
        p = self._parameterNode
        if isinstance(node, list):  # samples: each in the slice views (the first shown) and rendered in 3D
            self._finishRun("drew " + ", ".join(n.GetName() for n in node) + " (AI-generated)")
            slicer.util.setSliceViewerLayers(background=node[0], foreground=None, fit=True)
            for i, n in enumerate(node):
                self.logic.showVolumeRendering(n, visible=i == 0)
            return
        previewed = self._job.previewNode is node
        self._finishRun(f"wrote {node.GetName()}" + (" (in place of its preview)" if previewed else ""))
        # the selector goes back to "create new": the next Apply makes a new node rather than
        # silently replacing this result (pick a node explicitly to replace it)
        p.outputVolume = None
        if not previewed:  # a preview's views already show this node: they stay where the user left them
            slicer.util.setSliceViewerLayers(background=p.inputVolume, foreground=node, foregroundOpacity=0.5, fit=True)
        if p.showIn3D:
            self.logic.showVolumeRendering(node)

    def _finishRun(self, message: str, error: bool = False) -> None:
        self._timer.stop()
        self._job = None
        self.ui.applyButton.text = "Apply"
        self.log(message)
        if error:
            slicer.util.errorDisplay(message)
        self._checkCanApply()


#
# Logic
#


class MedILSlicerLogic(ScriptedLoadableModuleLogic, MedILLogicCore):
    """Usable without the GUI: ``MedILSlicerLogic().process("reconstruct", inputNode, OutputSpace(spacing=[1.0]))``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        MedILLogicCore.__init__(self)

    def getParameterNode(self):
        return MedILSlicerParameterNode(super().getParameterNode())

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Check PyTorch and the backend's requirements, by version; offer to install what is missing (never silently).

        PyTorch comes from the PyTorch extension (``PyTorchUtils``), which picks the build for this computer (CUDA or
        CPU); plain ``pip install torch`` would not (on Linux PyPI's torch is the CUDA build, gigabytes)."""
        import importlib.util

        from MedILSlicerLib.deps import TORCH_REQUIREMENT, installed_version, missing_requirements, satisfied, shipped_backend

        restart = False
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils  # the PyTorch extension
            except ImportError:
                slicer.util.errorDisplay(
                    "MedIL needs PyTorch. Install the PyTorch extension from the Extensions Manager (it installs the PyTorch "
                    "build that suits this computer), restart Slicer, then press Apply again."
                )
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
            restart = True
        version = installed_version("torch")
        if version is not None and not satisfied(TORCH_REQUIREMENT, version):
            slicer.util.errorDisplay(
                f"MedIL needs PyTorch {TORCH_REQUIREMENT}; this Slicer has {version}. Update it in the PyTorch Utils module "
                "(uninstall, then install), restart Slicer, then press Apply again."
            )
            return False
        if shipped_backend() is None and importlib.util.find_spec("medil_backend") is None:
            source = os.path.dirname(_HERE)  # a source checkout: the repository root holds the backend's pyproject.toml
            if not os.path.exists(os.path.join(source, "pyproject.toml")):
                slicer.util.errorDisplay("MedIL's backend is missing from this installation: reinstall the MedIL extension.")
                return False
            if not slicer.util.confirmOkCancelDisplay(f"MedIL needs its backend package. Install it now from {source}?"):
                return False
            slicer.util.pip_install(f'"{source}"')
        missing = missing_requirements()
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                "MedIL needs these Python packages (or newer versions of them): " + ", ".join(missing) + ". Install them now with pip?"
            ):
                return False
            for req in missing:
                slicer.util.pip_install(f'"{req}"')  # Slicer shows pip's progress in its Python console log
        if restart:
            slicer.util.infoDisplay("PyTorch was installed. Restart Slicer before running MedIL.")
            return False
        return True

    def showVolumeRendering(self, node, visible: bool = True) -> None:
        vrLogic = slicer.modules.volumerendering.logic()
        displayNode = vrLogic.CreateDefaultVolumeRenderingNodes(node)
        displayNode.SetVisibility(visible)
        vrLogic.UpdateDisplayNodeFromVolumeNode(displayNode, node)


#
# Test
#


class MedILSlicerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import importlib.util
        import logging

        if importlib.util.find_spec("torch") is None:  # as SlicerTotalSegmentator's self-test: say it once, run nothing
            logging.info("MedIL self-test: PyTorch is not installed, so the tests that run the backend are skipped")
            return
        self.setUp()
        self.test_reconstruct_keeps_geometry()
        self.setUp()
        self.test_cancel_leaves_no_output()

    def _inputNode(self):
        import numpy as np

        rng = np.random.default_rng(0)
        array = (rng.random((20, 24, 18)) * 100).astype(np.float32)  # (k, j, i)
        node = slicer.util.addVolumeFromArray(array, name="medil_test_input")
        node.SetSpacing(1.2, 0.9, 2.5)
        node.SetOrigin(10.0, -20.0, 5.0)
        m = vtk.vtkMatrix4x4()
        m.SetElement(0, 0, -1.0)  # flipped x
        node.SetIJKToRASDirectionMatrix(m)
        return node

    def test_reconstruct_keeps_geometry(self):
        import numpy as np

        self.delayDisplay("MedIL: reconstruct onto a 1.5 mm grid")
        node = self._inputNode()
        out = MedILSlicerLogic().process("reconstruct", node, OutputSpace(spacing=[1.5]), waitForCompletion=True)
        self.assertIsNotNone(out)
        spacing = out.GetSpacing()
        self.assertTrue(np.allclose(spacing, 1.5, atol=1e-5))
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        node.GetIJKToRASDirectionMatrix(a)
        out.GetIJKToRASDirectionMatrix(b)
        self.assertTrue(all(abs(a.GetElement(r, c) - b.GetElement(r, c)) < 1e-6 for r in range(3) for c in range(3)))
        self.assertEqual(out.GetAttribute("MedIL.aiGenerated"), "true")
        self.delayDisplay("Test passed")

    def test_cancel_leaves_no_output(self):
        node = self._inputNode()
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        logic = MedILSlicerLogic()
        job = logic.process("reconstruct", node, OutputSpace(spacing=[0.3]), waitForCompletion=False)
        logic.cancel(job)
        self.assertFalse(job.backend.running())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), before)
        self.delayDisplay("Test passed")
