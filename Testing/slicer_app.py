"""Slicer's application layer, which the ``slicer-core`` wheel lacks, rebuilt on real parts so that
the module's widget code (MedILSlicer.py) runs in a test: real Qt widgets (PySide6, offscreen), a
real MRML scene and real MRML nodes (slicer-core), the real .ui. Rebuilt here, in a few lines each:
PythonQt's view of Qt objects (Qt properties as attributes), the scripted-module base classes (the
test class as Slicer's), ``parameterNodeWrapper`` (parameters stored in a real
``vtkMRMLScriptedModuleNode``, bound to the widgets named by their ``SlicerParameterName`` through
connectors that clear, refill, validate and signal as Slicer 5.10's do: see the section's notes),
``loadUI``, the node selector, and the dialogs (recorded, answered by the test).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from PySide6 import QtCore, QtGui, QtWidgets
from PySide6.QtCore import Property, QFile, Signal
from PySide6.QtUiTools import QUiLoader

REPO = Path(__file__).resolve().parents[1]


# -- custom widgets of the .ui -------------------------------------------------------------------
class qMRMLWidget(QtWidgets.QWidget):
    def setMRMLScene(self, scene) -> None:
        for combo in self.findChildren(qMRMLNodeComboBox):
            combo.setMRMLScene(scene)


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def _text(self):
        return self.title()

    def _set_text(self, value):
        self.setTitle(value)

    text = Property(str, _text, _set_text)
    collapsed = Property(bool, lambda self: False, lambda self, v: None)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """A node selector on a real MRML scene: the nodes of its types, "None" first if allowed; item data = node ID."""

    currentNodeChanged = Signal(object)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._types, self._none, self._noneText, self._scene, self._tags = [], False, "None", None, []
        self.currentIndexChanged.connect(lambda _: self.currentNodeChanged.emit(self.currentNode()))

    nodeTypes = Property("QStringList", lambda self: self._types, lambda self, v: setattr(self, "_types", list(v)))
    noneEnabled = Property(bool, lambda self: self._none, lambda self, v: setattr(self, "_none", bool(v)))
    noneDisplay = Property(str, lambda self: self._noneText, lambda self, v: setattr(self, "_noneText", v))
    addEnabled = Property(bool, lambda self: False, lambda self, v: None)
    removeEnabled = Property(bool, lambda self: False, lambda self, v: None)
    renameEnabled = Property(bool, lambda self: False, lambda self, v: None)

    def setMRMLScene(self, scene) -> None:
        for tag in self._tags:
            self._scene.RemoveObserver(tag)
        self._scene = scene
        self._tags = [scene.AddObserver(e, lambda *a: self._refresh()) for e in (scene.NodeAddedEvent, scene.NodeRemovedEvent)]
        self._refresh()

    def _nodes(self):
        return [
            n
            for t in self._types
            for n in (self._scene.GetNodesByClass(t).GetItemAsObject(i) for i in range(self._scene.GetNumberOfNodesByClass(t)))
        ]

    def _refresh(self) -> None:
        current = self.currentData()
        self.blockSignals(True)
        self.clear()
        if self._none:
            self.addItem(self._noneText, None)
        for n in self._nodes():
            self.addItem(n.GetName() or n.GetID(), n.GetID())
        index = self.findData(current) if current is not None else -1
        self.setCurrentIndex(index if index >= 0 else 0 if (self._none or self.count()) else -1)
        self.blockSignals(False)
        if self.currentData() != current:
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        node_id = self.currentData()
        return self._scene.GetNodeByID(node_id) if (node_id and self._scene) else None

    def setCurrentNode(self, node) -> None:
        index = self.findData(node.GetID()) if node is not None else (0 if self._none else -1)
        if index >= 0 and index != self.currentIndex():
            self.setCurrentIndex(index)


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    """Slicer's selector of several nodes: each item has a check box; ``checkedNodes()``, ``setCheckState(node, state)``."""

    checkedNodesChanged = Signal()

    def _refresh(self) -> None:
        checked = {n.GetID() for n in self.checkedNodes()} if self.count() else set()
        super()._refresh()
        model = self.model()
        for i in range(self.count()):
            item = model.item(i)
            item.setFlags(item.flags() | QtCore.Qt.ItemIsUserCheckable)
            item.setCheckState(QtCore.Qt.Checked if self.itemData(i) in checked else QtCore.Qt.Unchecked)
        self._show_checked()

    def _show_checked(self) -> None:
        """As Slicer shows it: the checked nodes' names (none: empty), not a current item."""
        self.blockSignals(True)
        self.setCurrentIndex(-1)
        self.blockSignals(False)
        self.setPlaceholderText(", ".join(n.GetName() for n in self.checkedNodes()))

    def checkedNodes(self):
        model = self.model()
        ids = [self.itemData(i) for i in range(self.count()) if model.item(i).checkState() == QtCore.Qt.Checked]
        return [self._scene.GetNodeByID(i) for i in ids if i and self._scene]

    def checkState(self, node):
        index = self.findData(node.GetID())
        return self.model().item(index).checkState() if index >= 0 else QtCore.Qt.Unchecked

    def setCheckState(self, node, state) -> None:
        index = self.findData(node.GetID())
        if index >= 0:
            self.model().item(index).setCheckState(state)
            self._show_checked()
            self.checkedNodesChanged.emit()


class PythonQtObject:
    """A Qt object as PythonQt (Slicer's binding) shows it: Qt properties are attributes (``button.enabled = False``,
    ``combo.currentText``); everything else (methods, signals) is the object's own. ``raw`` is the PySide6 object."""

    __slots__ = ("raw",)

    def __init__(self, obj) -> None:
        object.__setattr__(self, "raw", obj)

    def __getattr__(self, name):
        if self.raw.metaObject().indexOfProperty(name) >= 0:
            return self.raw.property(name)
        return getattr(self.raw, name)

    def __setattr__(self, name, value) -> None:
        if self.raw.metaObject().indexOfProperty(name) < 0:
            raise AttributeError(f"{type(self.raw).__name__} has no Qt property {name!r}")
        self.raw.setProperty(name, value)


def raw(obj):
    return obj.raw if isinstance(obj, PythonQtObject) else obj


def load_ui(path) -> QtWidgets.QWidget:
    loader = QUiLoader()
    for cls in (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLCheckableNodeComboBox):
        loader.registerCustomWidget(cls)
    f = QFile(str(path))
    assert f.open(QFile.ReadOnly)
    widget = loader.load(f)
    f.close()
    assert widget is not None, loader.errorString()
    return widget


# -- parameterNodeWrapper ------------------------------------------------------------------------
# Behaves as Slicer's own (Slicer/Slicer, Base/Python/slicer/parameterNodeWrapper: wrapper.py at 07cbed6,
# guiConnectors.py at 0e31bd8, validators.py at 01c2def; the Slicer 5.10 line), where the module touches it:
#
# - validators (Choice, WithinRange) run on every write and raise ValueError for a value outside them;
# - connectGui binds every widget with a SlicerParameterName through a connector chosen by widget type:
#   QCheckBox (stateChanged), QSpinBox/QSlider to int and QDoubleSpinBox to float (their range set from
#   WithinRange, else unbounded), QComboBox to a str/int/float/bool with a Choice (required: RuntimeError
#   without one; the combo box is CLEARED and REFILLED from the choices when the connector is made, read
#   and written BY INDEX, a value outside the choices raises ValueError; signal currentIndexChanged), and
#   qMRMLNodeComboBox to a node (its nodeTypes set from the annotation; signal currentNodeChanged);
# - each connector first writes the parameter's value to its widget, then listens to it; a widget change
#   sets the parameter unless the GUI is being updated from the parameter node;
# - every ModifiedEvent of the parameter node writes every bound value back to its widget, with the
#   widgets' signals NOT blocked (the module's own slots see them); disconnectGui drops the connectors of
#   one tag, the observer stays (as in Slicer).
class Validator:
    def validate(self, value) -> None:
        raise NotImplementedError


class Choice(Validator):
    def __init__(self, choices) -> None:
        self.choices = choices

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class WithinRange(Validator):
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


def _split(annotation):
    """(the bare type, its validators) of a possibly ``Annotated`` type."""
    base = getattr(annotation, "__origin__", annotation)
    extras = getattr(annotation, "__metadata__", ())
    return base, [e for e in extras if isinstance(e, Validator)]


def _first(validators, kind):
    return next((v for v in validators if isinstance(v, kind)), None)


class _Connector:
    """One widget bound to one parameter (Slicer's GuiConnector): ``read``, ``write``, ``onChanged``."""

    def __init__(self, widget, signal) -> None:
        self.widget, self._signal, self._callback = widget, signal, None

    def onChanged(self, callback) -> None:
        if self._callback is not None:
            self._signal.disconnect(self._changed)
        self._callback = callback
        if callback is not None:
            self._signal.connect(self._changed)

    def _changed(self, *_) -> None:
        if self._callback:
            self._callback()


class _CheckBox(_Connector):
    def __init__(self, w, kind, validators) -> None:
        super().__init__(w, w.stateChanged)

    def read(self):
        return bool(self.widget.isChecked())

    def write(self, value) -> None:
        self.widget.setChecked(bool(value))


class _SpinBox(_Connector):
    def __init__(self, w, kind, validators) -> None:
        super().__init__(w, w.valueChanged)
        r = _first(validators, WithinRange)
        if isinstance(w, QtWidgets.QDoubleSpinBox):
            w.setMinimum(r.minimum if r else float("-inf"))
            w.setMaximum(r.maximum if r else float("inf"))
        else:
            w.setRange(r.minimum if r else -(2**31), r.maximum if r else 2**31 - 1)

    def read(self):
        return self.widget.value()

    def write(self, value) -> None:
        self.widget.setValue(value)


class _ComboBox(_Connector):
    def __init__(self, w, kind, validators) -> None:
        super().__init__(w, w.currentIndexChanged)
        choice = _first(validators, Choice)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        self._choices = choice.choices
        w.clear()  # emits currentIndexChanged(-1) / currentTextChanged('') to every other slot, as in Slicer
        for c in self._choices:
            w.addItem(str(c))

    def read(self):
        return self._choices[self.widget.currentIndex()]

    def write(self, value) -> None:
        for index, c in enumerate(self._choices):
            if c == value:
                self.widget.setCurrentIndex(index)
                return
        raise ValueError(f"Unable to find value {value} in choices {self._choices}")


class _NodeComboBox(_Connector):
    def __init__(self, w, kind, validators) -> None:
        super().__init__(w, w.currentNodeChanged)
        w.nodeTypes = [kind.__name__]

    def read(self):
        return self.widget.currentNode()

    def write(self, value) -> None:
        self.widget.setCurrentNode(value)


def _connector(widget, kind, validators) -> _Connector:
    """The connector Slicer would choose for this widget and parameter type (by exact widget type, as Slicer does)."""
    if isinstance(widget, qMRMLNodeComboBox) and hasattr(kind, "GetID"):
        return _NodeComboBox(widget, kind, validators)
    if type(widget) is QtWidgets.QCheckBox and kind is bool:
        return _CheckBox(widget, kind, validators)
    if type(widget) in (QtWidgets.QSpinBox, QtWidgets.QSlider) and kind is int:
        return _SpinBox(widget, kind, validators)
    if type(widget) is QtWidgets.QDoubleSpinBox and kind is float:
        return _SpinBox(widget, kind, validators)
    if type(widget) is QtWidgets.QComboBox and kind in (int, float, str, bool):
        return _ComboBox(widget, kind, validators)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{kind}' to widget type '{type(widget)}'")


def parameterNodeWrapper(cls):
    """Fields with annotations and defaults, stored as JSON parameters (nodes: as node references) of a real MRML node."""
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: (*_split(hint), getattr(cls, name, None)) for name, hint in hints.items()}

    class Wrapper:
        _fields = fields

        def __init__(self, node) -> None:
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_guis", {})
            object.__setattr__(self, "_next_tag", 0)
            object.__setattr__(self, "_updating_gui", False)
            for name, (_, _, default) in fields.items():
                if not self._is_node(name) and not node.GetParameter(name):
                    node.SetParameter(name, json.dumps(default))

        def _is_node(self, name) -> bool:
            kind = fields[name][0]
            return isinstance(kind, type) and hasattr(kind, "GetID")

        def dataType(self, name):
            return fields[name][0]

        def __getattr__(self, name):
            if name not in fields:
                raise AttributeError(name)
            if self._is_node(name):
                return self.parameterNode.GetNodeReference(name)
            return json.loads(self.parameterNode.GetParameter(name))

        def __setattr__(self, name, value) -> None:
            if name not in fields:
                raise AttributeError(f"no parameter {name}")
            for v in fields[name][1]:
                v.validate(value)
            was = self.parameterNode.StartModify()
            try:
                if self._is_node(name):
                    self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                else:
                    self.parameterNode.SetParameter(name, json.dumps(value))
            finally:
                self.parameterNode.EndModify(was)

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            return self.parameterNode.RemoveObserver(tag)

        def _update_gui(self, *_) -> None:
            if self._updating_gui:
                return
            object.__setattr__(self, "_updating_gui", True)
            was = self.parameterNode.StartModify()
            try:
                for mapping in list(self._guis.values()):
                    for name, connector in mapping.items():
                        connector.write(getattr(self, name))
            finally:
                self.parameterNode.EndModify(was)
                object.__setattr__(self, "_updating_gui", False)

        def connectGui(self, ui):
            widgets = {}
            for widget in map(raw, vars(ui).values()):
                param = widget.property("SlicerParameterName") if isinstance(widget, QtWidgets.QWidget) else None
                if param:
                    if param not in fields:
                        raise ValueError(f"Cannot find a param with the given name: {param}")
                    widgets[param] = widget
            mapping = {name: _connector(w, fields[name][0], fields[name][1]) for name, w in widgets.items()}
            tag = self._next_tag
            object.__setattr__(self, "_next_tag", tag + 1)
            self._guis[tag] = mapping
            for name, connector in mapping.items():
                connector.write(getattr(self, name))

                def callback(n=name, c=connector):
                    was = self.parameterNode.StartModify()
                    try:
                        if not self._updating_gui:
                            setattr(self, n, c.read())
                    finally:
                        self.parameterNode.EndModify(was)

                connector.onChanged(callback)
            self.parameterNode.AddObserver(vtk_modified_event(), self._update_gui)
            return tag

        def disconnectGui(self, tag) -> None:
            for connector in self._guis.pop(tag, {}).values():
                connector.onChanged(None)

    Wrapper.__name__ = cls.__name__
    return Wrapper


def vtk_modified_event() -> int:
    import vtk

    return vtk.vtkCommand.ModifiedEvent


# -- the application -----------------------------------------------------------------------------
class Dialogs:
    """errorDisplay / confirmOkCancelDisplay / infoDisplay: recorded; confirmations answered by ``answer``."""

    def __init__(self) -> None:
        self.errors, self.questions, self.infos, self.delayed, self.answer = [], [], [], [], True

    def error(self, text, *a, **k):
        self.errors.append(str(text))

    def confirm(self, text, *a, **k):
        self.questions.append(str(text))
        return self.answer

    def info(self, text, *a, **k):
        self.infos.append(str(text))


class App:
    def __init__(self) -> None:
        self.connections = []

    def connect(self, signal, slot) -> None:
        self.connections.append((signal, slot))


def install(scene, module_dir: Path = REPO / "MedILSlicer"):
    """Put the application layer in place (``qt``, ``slicer.app``, ``slicer.mrmlScene``, the scripted-module
    classes, ``parameterNodeWrapper``, the GUI parts of ``slicer.util``); returns (module, dialogs, view calls)."""
    import slicer
    import slicer.util

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    qt = types.ModuleType("qt")
    for mod in (QtCore, QtGui, QtWidgets):
        for name in dir(mod):
            if name.startswith("Q"):
                setattr(qt, name, getattr(mod, name))
    qt.QTimer = lambda *a: PythonQtObject(QtCore.QTimer(*a))
    sys.modules["qt"] = qt
    dialogs, views = Dialogs(), []
    slicer.mrmlScene, slicer.app = scene, App()
    slicer.util.loadUI = load_ui
    slicer.util.childWidgetVariables = lambda w: types.SimpleNamespace(
        **{c.objectName(): PythonQtObject(c) for c in w.findChildren(QtCore.QObject) if c.objectName()}
    )
    slicer.util.errorDisplay, slicer.util.confirmOkCancelDisplay, slicer.util.infoDisplay = dialogs.error, dialogs.confirm, dialogs.info
    slicer.util.setSliceViewerLayers = lambda **kw: views.append(("layers", kw))
    slicer.util.delayDisplay = lambda message, autoCloseMsec=1000, **kw: dialogs.delayed.append(str(message))
    rendering = types.SimpleNamespace(
        logic=lambda: types.SimpleNamespace(
            CreateDefaultVolumeRenderingNodes=lambda node: types.SimpleNamespace(
                SetVisibility=lambda v: views.append(("render", node.GetName(), v))
            ),
            UpdateDisplayNodeFromVolumeNode=lambda d, n: None,
        )
    )
    slicer.modules = types.SimpleNamespace(volumerendering=rendering)

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.parent = parent if parent is not None else QtWidgets.QWidget()
            self.parent.isEntered = True
            self.layout = self.parent.layout() or QtWidgets.QVBoxLayout(self.parent)
            self.moduleName = "MedILSlicer"

        def setup(self) -> None:
            pass

        def resourcePath(self, rel) -> str:
            return str(module_dir / "Resources" / rel)

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self):
            node = scene.GetSingletonNode("MedILSlicer", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("MedILSlicer")
                node.SetName("MedILSlicer")
                scene.AddNode(node)
            return node

    import logging
    import unittest

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """As Slicer's (Base/Python/slicer/ScriptedLoadableModule.py): the test methods are the callables whose name
        holds "test"; runTest runs setUpClass, then setUp, the test and tearDown for each, then tearDownClass;
        delayDisplay goes to slicer.util.delayDisplay (recorded here: there is no window to show it in)."""

        def __init__(self, *args, **kwargs) -> None:
            self.moduleTestNames = []
            super().__init__(*args, **kwargs)
            self.enableScreenshots = False
            self.screenshotScaleFactor = 1.0
            if not self.moduleTestNames:
                self.moduleTestNames = [m for m in dir(self) if "test" in m and callable(getattr(self, m))]

        def delayDisplay(self, message, requestedDelay=None, msec=None) -> None:
            if hasattr(self, "messageDelay"):
                msec = self.messageDelay
            if msec is None:
                msec = requestedDelay
            if msec is None:
                msec = 100
            slicer.util.delayDisplay(message, msec)

        def setUp(self) -> None:
            return

        def tearDown(self) -> None:
            return

        def runTest(self) -> None:
            if not self.moduleTestNames:
                logging.warning("No test is defined in " + self.__class__.__name__)
                return
            self.setUpClass()
            for name in self.moduleTestNames:
                self.setUp()
                getattr(self, name)()
                self.tearDown()
            self.tearDownClass()

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.Choice, pnw.WithinRange, pnw.parameterNodeWrapper = Choice, WithinRange, parameterNodeWrapper
    sys.modules["slicer.ScriptedLoadableModule"], sys.modules["slicer.parameterNodeWrapper"] = slm, pnw
    slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper = slm, pnw

    sys.path.insert(0, str(module_dir))
    sys.modules.pop("MedILSlicer", None)
    import MedILSlicer

    return app, MedILSlicer, dialogs, views
