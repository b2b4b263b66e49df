"""Slicer's application layer, which the ``slicer-core`` wheel lacks, rebuilt on real parts so that
the module's widget code (MedILSlicer.py) runs in a test: real Qt widgets (PySide6, offscreen), a
real MRML scene and real MRML nodes (slicer-core), the real .ui. Rebuilt here, in a few lines each:
PythonQt's view of Qt objects (Qt properties as attributes), the scripted-module base classes,
``parameterNodeWrapper`` (parameters stored in a real ``vtkMRMLScriptedModuleNode``, bound to the
widgets named by their ``SlicerParameterName``), ``loadUI``, the node selector, and the dialogs
(recorded, answered by the test).
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
class Choice:
    def __init__(self, choices) -> None:
        self.choices = list(choices)


class WithinRange:
    def __init__(self, lo, hi) -> None:
        self.lo, self.hi = lo, hi


def _base_type(annotation):
    return getattr(annotation, "__origin__", annotation)


def parameterNodeWrapper(cls):
    """Fields with annotations and defaults, stored as JSON parameters (nodes: as node references) of a real MRML node."""
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: (_base_type(hint), getattr(cls, name, None)) for name, hint in hints.items()}

    class Wrapper:
        _fields = fields

        def __init__(self, node) -> None:
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_guis", {})
            for name, (_, default) in fields.items():
                if not self._is_node(name) and not node.GetParameter(name):
                    node.SetParameter(name, json.dumps(default))

        def _is_node(self, name) -> bool:
            kind = fields[name][0]
            return isinstance(kind, type) and hasattr(kind, "GetID")

        def __getattr__(self, name):
            if name not in fields:
                raise AttributeError(name)
            if self._is_node(name):
                return self.parameterNode.GetNodeReference(name)
            return json.loads(self.parameterNode.GetParameter(name))

        def __setattr__(self, name, value) -> None:
            if name not in fields:
                raise AttributeError(f"no parameter {name}")
            if self._is_node(name):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, json.dumps(value))
            for bindings in self._guis.values():
                for widget, param, _ in bindings:
                    if param == name:
                        _to_widget(widget, value)

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            return self.parameterNode.RemoveObserver(tag)

        def connectGui(self, ui):
            bindings = []
            for widget in map(raw, vars(ui).values()):
                param = widget.property("SlicerParameterName") if isinstance(widget, QtWidgets.QWidget) else None
                if not param:
                    continue
                _to_widget(widget, getattr(self, param))
                signal, read = _widget_signal(widget)

                def update(*_, p=param, r=read):
                    value = r()
                    if getattr(self, p) != value:
                        setattr(self, p, value)

                signal.connect(update)
                bindings.append((widget, param, (signal, update)))
            tag = len(self._guis) + 1
            self._guis[tag] = bindings
            return tag

        def disconnectGui(self, tag) -> None:
            for _, _, (signal, update) in self._guis.pop(tag, []):
                signal.disconnect(update)

    Wrapper.__name__ = cls.__name__
    return Wrapper


def _to_widget(widget, value) -> None:
    widget.blockSignals(True)
    if isinstance(widget, qMRMLNodeComboBox):
        widget.setCurrentNode(value)
    elif isinstance(widget, QtWidgets.QComboBox):
        widget.setCurrentText(str(value))
    elif isinstance(widget, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
        widget.setValue(value)
    elif isinstance(widget, QtWidgets.QCheckBox):
        widget.setChecked(bool(value))
    widget.blockSignals(False)


def _widget_signal(widget):
    if isinstance(widget, qMRMLNodeComboBox):
        return widget.currentNodeChanged, widget.currentNode
    if isinstance(widget, QtWidgets.QComboBox):
        return widget.currentTextChanged, widget.currentText
    if isinstance(widget, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
        return widget.valueChanged, widget.value
    if isinstance(widget, QtWidgets.QCheckBox):
        return widget.toggled, widget.isChecked
    raise TypeError(f"no binding for {type(widget).__name__}")


# -- the application -----------------------------------------------------------------------------
class Dialogs:
    """errorDisplay / confirmOkCancelDisplay / infoDisplay: recorded; confirmations answered by ``answer``."""

    def __init__(self) -> None:
        self.errors, self.questions, self.infos, self.answer = [], [], [], True

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

    class ScriptedLoadableModuleTest:
        pass

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
