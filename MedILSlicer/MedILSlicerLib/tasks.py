"""The panel's task list, read from the backend's task specs (``medil tasks --json``; pure Python, no Slicer).

Until the backend answers, the panel uses the copy bundled with the extension
(``Resources/tasks.json``, written by ``python tools/gen_ui.py``; a test checks it equals the
backend's). Once the backend is installed, :func:`use_specs` replaces it with what that backend
publishes, so a task, option or method the backend adds reaches the panel and the logic without
an edit here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

#: the specs bundled with the extension (the backend's ``medil tasks --json`` when the extension was built)
BUNDLED_SPECS = Path(__file__).resolve().parents[1] / "Resources" / "tasks.json"

#: panel fields that name settings outside the task specs (where the output goes)
EXTRA_PANEL_FIELDS = {"overwrite": "Output volume"}

#: the panel's widget for each task option it shows (the option's published help is its tooltip); one widget may serve
#: the same option of several tasks
OPTION_WIDGETS = {
    ("superres", "method"): "superresMethodComboBox",
    ("superres", "samples"): "superresSamplesSpinBox",
    ("superres", "time_budget"): "superresTimeBudgetSpinBox",
    ("sample", "n"): "sampleCountSpinBox",
    ("sample", "seed"): "sampleSeedSpinBox",
    ("sample", "steps"): "sampleStepsSpinBox",
    ("reconstruct", "modality"): "modalityComboBox",
    ("superres", "modality"): "modalityComboBox",
}


def panel_parameter(widget: str) -> str:
    """The parameter node field that holds a panel widget's value: its name without the widget kind
    (``superresTimeBudgetSpinBox`` -> ``superresTimeBudget``; the .ui binds it by that name)."""
    for kind in ("ComboBox", "SpinBox"):
        if widget.endswith(kind):
            return widget[: -len(kind)]
    raise ValueError(f"{widget} is not a combo or spin box")


@dataclass(frozen=True)
class Task:
    key: str  # the backend's name for it (logic, provenance attributes)
    label: str  # the panel's text
    available: bool  # the backend can run it in this version
    needs_input: bool  # it reads an input volume (sampling does not)
    hint: str = ""  # what it is good for and how long it takes on a CPU (the panel's tooltip)
    model_kind: str = ""  # the kind of model it takes ("" if it adapts to the scan itself)
    max_inputs: int = 1  # several input volumes (e.g. thick-slice stacks of one anatomy) when more than 1
    options: tuple[dict, ...] = ()  # the spec's declared options (name, type, default, range, choices, flag, label)
    context: tuple[dict, ...] = ()  # the run context's options every task takes (device, precision, max_memory)
    model_when: dict = field(default_factory=dict)  # the model applies only for these option values


@dataclass(frozen=True)
class Catalog:
    """The tasks one backend publishes, and what the panel derives from them."""

    tasks: tuple[Task, ...]
    panel_fields: dict  # option name -> the panel field it is set in (for errors that point at options)

    @classmethod
    def from_specs(cls, specs: list[dict]) -> Catalog:
        tasks, fields = [], dict(EXTRA_PANEL_FIELDS)
        for spec in specs:
            hint = spec["help"][:1].upper() + spec["help"][1:] + "."
            tasks.append(
                Task(
                    spec["name"],
                    spec.get("label") or spec["name"],
                    available=True,
                    needs_input=bool(spec["needs_input"]),
                    hint=hint,
                    model_kind=spec.get("model_kind", ""),
                    max_inputs=int(spec.get("max_inputs", 1)),
                    options=tuple(spec.get("options", ())),
                    context=tuple(spec.get("context", ())),
                    model_when={k: tuple(v) for k, v in spec.get("model_when", {}).items()},
                )
            )
            for o in (*spec.get("options", ()), *spec.get("context", ())):
                if o.get("label"):
                    fields.setdefault(o["name"], o["label"])
            fields.update(spec.get("grid_labels", {}))
        if not tasks:
            raise ValueError("the backend published no tasks")
        return cls(tuple(tasks), fields)

    def by_key(self, key: str) -> Task:
        for t in self.tasks:
            if t.key == key:
                return t
        raise KeyError(key)

    def by_label(self, label: str) -> Task:
        for t in self.tasks:
            if t.label == label:
                return t
        raise KeyError(label)

    def option(self, task: str, name: str) -> dict:
        for o in self.by_key(task).options:
            if o["name"] == name:
                return o
        raise KeyError(f"{task}.{name}")

    def choices(self, task: str, name: str) -> list[str]:
        """An option's choices, its default first."""
        o = self.option(task, name)
        return sorted(o.get("choices") or [], key=lambda c: c != o.get("default"))

    def option_names(self, task: str) -> list[str]:
        """The names ``task`` takes: its declared options and its run context's (device, precision, max_memory)."""
        t = self.by_key(task)
        return [o["name"] for o in (*t.options, *t.context)]

    def option_arguments(self, task: str, values: dict) -> list[str]:
        """The backend's command-line arguments for the values of ``task``'s declared and context options in
        ``values`` (names the task does not take, ``None`` and defaults are left out), by each option's published flag."""
        args: list[str] = []
        t = self.by_key(task)
        for o in (*t.options, *t.context):
            value = values.get(o["name"])
            if value is None or value == o.get("default"):
                continue
            if o.get("flag_only"):
                args += [o["flag"]] if value else []
            elif o.get("type") == "float":
                args += [o["flag"], repr(float(value))]
            elif o.get("type") == "int":
                args += [o["flag"], str(int(value))]
            else:
                args += [o["flag"], str(value)]
        return args

    def uses_model(self, task: str, options: dict) -> bool:
        """Whether a chosen model applies to ``task`` run with ``options`` (e.g. superres's generative methods only)."""
        t = self.by_key(task)
        return bool(t.model_kind) and all(options.get(name) in values for name, values in t.model_when.items())


def read_specs(path: Path = BUNDLED_SPECS) -> list[dict]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


_catalog = Catalog.from_specs(read_specs())


def catalog() -> Catalog:
    """The current catalog: the backend's specs once :func:`use_specs` has been given them, else the bundled copy."""
    return _catalog


def use_specs(specs: list[dict]) -> Catalog:
    """Use the specs a backend published (``medil tasks --json``) from now on."""
    global _catalog
    _catalog = Catalog.from_specs(specs)
    return _catalog


# the bundled names, for what must be fixed when the module is imported (the .ui's items, parameter choices)
TASKS: tuple[Task, ...] = _catalog.tasks
LABELS: list[str] = [t.label for t in TASKS]
AVAILABLE_KEYS: tuple[str, ...] = tuple(t.key for t in TASKS if t.available)
#: super-resolution's methods, the default first
SUPERRES_METHODS: list[str] = _catalog.choices("superres", "method")
#: the methods that run through a latent diffusion model (the panel's model choice applies to them)
GENERATIVE_SUPERRES_METHODS: tuple[str, ...] = tuple(_catalog.by_key("superres").model_when.get("method", ()))

#: a Qt spin box holds a signed 32-bit int: the panel's ceiling where a spec's range goes further (seeds)
QT_INT_MAX = 2**31 - 1
#: the panel's ceiling for an option whose spec sets none (how many volumes one press draws)
PANEL_COUNT_MAX = 100


def option_range(task: str, name: str, *, special_low=None) -> tuple:
    """(low, high) of a panel field: the bundled spec's range, capped where Qt's spin boxes stop (ints at
    :data:`QT_INT_MAX`; no ceiling in the spec: :data:`PANEL_COUNT_MAX`); ``special_low`` replaces the low end
    for a field whose lowest value means something else (0 steps: the model's own)."""
    o = _catalog.option(task, name)
    low = o.get("low") if special_low is None else special_low
    high = o.get("high")
    if o.get("type") == "int":
        high = min(int(high if high is not None else PANEL_COUNT_MAX), QT_INT_MAX)
        return int(low), high
    return float(low), float(high if high is not None else PANEL_COUNT_MAX)


#: an input axis is a slice axis when its spacing is at least this many times the finest (the backend's
#: ``medil_backend.ops.superres.THICK_RATIO``; a test checks they agree)
THICK_RATIO = 1.5


def suggested_task(spacing) -> str:
    """The task the panel opens on for an input of this voxel spacing: super-resolution for thick slices
    (an axis at least THICK_RATIO times the finest), reconstruct/resample otherwise."""
    sp = [abs(float(s)) for s in spacing]
    return "superres" if sp and min(sp) > 0 and max(sp) >= THICK_RATIO * min(sp) else "reconstruct"


def task_by_label(label: str) -> Task:
    return catalog().by_label(label)


def task_by_key(key: str) -> Task:
    return catalog().by_key(key)
