"""The one list of tasks that the panel, the logic and the generated .ui share (pure Python, no Slicer).

A task becomes available in the panel and the logic by flipping ``available`` here, once the
backend has it; ``tools/gen_ui.py`` writes the same labels into the .ui.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    key: str  # the backend's name for it (logic, provenance attributes)
    label: str  # the panel's text
    available: bool  # the backend can run it in this version
    needs_input: bool  # it reads an input volume (sampling does not)
    hint: str = ""  # what it is good for and how long it takes on a CPU (the panel's tooltip)


TASKS: tuple[Task, ...] = (
    Task(
        "reconstruct",
        "Reconstruct / resample",
        available=True,
        needs_input=True,
        hint="Any input onto any grid (spacing, orientation, field of view, another volume's grid) through a MedIL "
        "autoencoder. Best for isotropic inputs; about 10 s for a head at 1 mm on 2 CPU cores, seconds on a GPU.",
    ),
    Task(
        "superres",
        "Super-resolve",
        available=True,
        needs_input=True,
        hint="Thick-slice scans to thin slices: 'adapt' trains a small network on this scan's own in-plane detail "
        "(the time budget, 3 min by default on a CPU, shared by the samples), 'fast' is B-spline with data "
        "consistency (seconds). Above B-spline on every held-out scan.",
    ),
    Task(
        "sample",
        "Sample",
        available=True,
        needs_input=False,
        hint="A research demo: new AI-generated heads drawn onto the output grid by a latent diffusion model "
        "(varied, blurry and textured, not realistic anatomy); about 20 s a head on 2 CPU cores.",
    ),
)

LABELS: list[str] = [t.label for t in TASKS]
AVAILABLE_KEYS: tuple[str, ...] = tuple(t.key for t in TASKS if t.available)

#: super-resolution's methods, the default first (the backend's ``medil_backend.ops.superres.METHODS``)
SUPERRES_METHODS: list[str] = ["adapt", "fast", "inverse", "cycles"]
#: the methods that run through a latent diffusion model (the panel's model choice applies to them)
GENERATIVE_SUPERRES_METHODS: tuple[str, ...] = ("inverse", "cycles")


#: an input axis is a slice axis when its spacing is at least this many times the finest (the backend's
#: ``medil_backend.ops.superres.THICK_RATIO``; a test checks they agree)
THICK_RATIO = 1.5


def suggested_task(spacing) -> str:
    """The task the panel opens on for an input of this voxel spacing: super-resolution for thick slices
    (an axis at least THICK_RATIO times the finest), reconstruct/resample otherwise."""
    sp = [abs(float(s)) for s in spacing]
    return "superres" if sp and min(sp) > 0 and max(sp) >= THICK_RATIO * min(sp) else "reconstruct"


def task_by_label(label: str) -> Task:
    for t in TASKS:
        if t.label == label:
            return t
    raise KeyError(label)


def task_by_key(key: str) -> Task:
    for t in TASKS:
        if t.key == key:
            return t
    raise KeyError(key)
