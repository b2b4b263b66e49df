"""The task contract: what every task (reconstruct, superres, sample, ...) declares and returns.

- :class:`RunContext`: device, precision, memory limit, progress and cancel, resolved once and
  checked before any work (a bad device or limit is refused before a file is read);
- :class:`TaskSpec`: a task's name, whether it reads an input volume, the kind of model it takes,
  and its declared :class:`Option` s (type, default, range, choices, CLI flag, panel label);
  ``run(ctx, volume | None, request, model, **options) -> TaskResult``;
- :class:`TaskResult`: the output volumes (with their roles: the output, an uncertainty map, one
  volume of a series) and one typed :class:`Provenance` record.

This module imports no torch (the CLI builds its parser from it at start-up); the runners that
compute live in :mod:`medil_backend.ops.runners`. The CLI builds its subcommands from :data:`TASKS`, ``medil tasks --json`` publishes them, and the
Slicer module checks its task list against them. A new task is one :class:`TaskSpec` here plus its
operation module. This module knows no argparse, Slicer or Qt; option ranges are checked here,
once, with the option's name in the error (each frontend spells it its own way).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any

from .errors import MedILError
from .geometry import Grid, Volume
from .limits import MAX_SEED, check_seed
from .methods import GENERATIVE_SUPERRES_METHODS, SUPERRES_METHODS, TIME_BUDGET_MIN, check_sampling, default_time_budget

# -- options -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One setting of a task. ``low``/``high`` bound numbers (inclusive; ``low_open``: ``low`` itself is
    refused), ``choices`` bound strings; ``default`` None means "the model's or the task's own"."""

    name: str
    type: type
    default: Any
    help: str
    label: str = ""  # the Slicer panel's name for it ("" when the panel does not show it)
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    flag_only: bool = False  # a switch (no value)
    metavar: str | None = None
    path: bool = False  # a file the task writes (checked with the outputs, before any work)
    stacks_only: bool = False  # applies only when several inputs (stacks) are given
    stacks_default: Any = None  # the default when several inputs (stacks) are given, where it differs (one sample)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """``value`` converted and checked against the declared type, choices and range."""
        what = self.name.replace("_", " ")
        if value is None:
            return None
        if self.flag_only:
            return bool(value)
        if self.choices:
            if value not in self.choices:
                raise MedILError(f"{what} must be one of {', '.join(map(str, self.choices))}, not {value!r}", options=(self.name,))
            return value
        if self.type is int:
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise MedILError(f"{what} must be a whole number, not {value!r}", options=(self.name,)) from None
            if isinstance(value, float) and value != number:
                raise MedILError(f"{what} must be a whole number, not {value!r}", options=(self.name,))
            value = number
        elif self.type is float:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise MedILError(f"{what} must be a number, not {value!r}", options=(self.name,)) from None
            if not math.isfinite(value):
                raise MedILError(f"{what} must be a finite number, not {value!r}", options=(self.name,))
        if self.type in (int, float):
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and value > self.high
            if too_low or too_high:
                if self.low is not None and self.high is not None:
                    span = f"between {self.low:g} ({'excluded' if self.low_open else 'included'}) and {self.high:g}"
                elif self.low is not None:
                    span = f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
                else:
                    span = f"at most {self.high:g}"
                raise MedILError(f"{what} must be {span}, not {value!r}", options=(self.name,))
        return value

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "type"}
        out.update(type=self.type.__name__, flag=self.flag, choices=list(self.choices))
        return out


# -- run context -----------------------------------------------------------------------------------------


@dataclass
class RunContext:
    """Everything a run needs besides its data, resolved once: ``device`` (a torch device), ``precision``
    (``auto``, ``float32`` or ``bfloat16``; each task applies it where it is exact enough), the memory
    limit in bytes, a progress callback ``(fraction, message)``, a cancel token and, optionally, an
    ``on_output`` callback that takes each output volume as soon as it is made (so a series of large
    volumes need not be held in memory)."""

    device: Any
    precision: str
    max_memory_gb: float | None
    budget_bytes: float
    progress: Callable[[float, str], None] | None = None
    cancel: Any = None
    on_output: Callable[[Output], None] | None = None
    #: loaded models by what was asked for, kept across runs that share it (a batch worker's scans): each model is
    #: read and its sha256 checked once per worker, not once per scan
    models: dict = field(default_factory=dict)

    def cached(self, key: tuple, load: Callable[[], Any]) -> Any:
        """``load()``'s result, loaded once for ``key`` in this context's :attr:`models`."""
        if key not in self.models:
            self.models[key] = load()
        return self.models[key]

    @classmethod
    def resolve(
        cls, device: str = "auto", precision: str = "auto", max_memory_gb: float | None = None, progress=None, cancel=None, on_output=None
    ) -> RunContext:
        from .limits import check_memory_limit
        from .ops.runtime import resolve_device, resolve_precision

        dev = resolve_device(device)
        resolve_precision(precision, dev)  # an unknown precision is refused now
        return cls(dev, precision or "auto", max_memory_gb, check_memory_limit(max_memory_gb), progress, cancel, on_output)

    def emit(self, output: Output, keep: list[Output]) -> None:
        """Hand ``output`` to ``on_output`` when there is one, else keep it in the result."""
        if self.on_output is not None:
            self.on_output(output)
        else:
            keep.append(output)


# -- results ---------------------------------------------------------------------------------------------


@dataclass
class Output:
    """One volume a task made: ``role`` is ``output``, ``uncertainty``, ``preview`` or ``sample``; ``index`` numbers
    a series; ``record`` adds to the provenance of this file alone (e.g. its seed)."""

    volume: Volume
    role: str = "output"
    index: int = 0
    record: dict = field(default_factory=dict)
    dtype: Any = None  # the file's voxel type (None: float32)


@dataclass
class ModelRef:
    name: str
    sha256: str | None
    role: str = "model"  # "model", "autoencoder", "prior"


@dataclass
class Provenance:
    """What made a result: the task, every model and its sha256, the output grid, seeds, device and
    precision, the memory plan's summary and the task's own settings."""

    task: str
    models: list[ModelRef]
    grid: Grid | None
    device: str
    precision: str
    seeds: list[int] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def record(self, **extra) -> dict:
        """The flat JSON record for sidecars and file headers (``model``/``model_sha256``: the first model)."""
        from . import __version__

        first = self.models[0] if self.models else ModelRef("none", None)
        out = {
            "task": self.task,
            "model": first.name,
            "model_sha256": first.sha256,
            "models": [asdict(m) for m in self.models],
            "version": __version__,
            "device": self.device,
            "precision": self.precision,
        }
        if self.grid is not None:
            out["grid"] = {"shape": list(self.grid.shape), "affine_ras": self.grid.affine.round(9).tolist()}
        if self.seeds:
            out["seeds"] = list(self.seeds)
        if self.plan:
            out["plan"] = self.plan
        out.update(self.settings)
        out.update(extra)
        return out


@dataclass
class TaskResult:
    outputs: list[Output]
    provenance: Provenance
    summary: dict = field(default_factory=dict)  # what a frontend shows after the run (residuals, modality, ...)


# -- output-grid requests --------------------------------------------------------------------------------


@dataclass
class GridRequest:
    """What the user asked of the output grid; each task resolves it with its own default."""

    like: Grid | None = None
    spacing: Sequence[float] | None = None
    orientation: Any = None
    fov: Sequence[float] | None = None

    @property
    def given(self) -> bool:
        return self.like is not None or bool(self.spacing) or self.orientation is not None or self.fov is not None

    def check(self) -> GridRequest:
        if self.like is not None and (self.spacing or self.orientation is not None or self.fov):
            raise MedILError(
                "a reference grid fixes the whole output grid; drop the spacing, orientation and field of view", options=("like",)
            )
        if self.spacing is not None and len(self.spacing) not in (1, 3):
            raise MedILError(f"the spacing takes one value (isotropic) or three, not {len(self.spacing)}", options=("spacing",))
        return self


# -- the tasks -------------------------------------------------------------------------------------------

_OPTIONS_TYPES: dict[str, type] = {}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    help: str  # what it is for, with the expected time on a CPU
    needs_input: bool
    model_kind: str  # "autoencoder", "diffusion" or "" (the task adapts to the scan itself)
    options: tuple[Option, ...]
    runner: str  # "module:function" of the runner, imported when the task runs
    series: str = ""  # the option that counts a series of outputs (OUTPUT_000, OUTPUT_001, ...)
    check: Callable[[dict, GridRequest], None] | None = None  # options that only make sense together, checked before any work
    label: str = ""  # the Slicer panel's name for it
    model_when: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the model applies only for these option values
    max_inputs: int = 1  # several inputs (e.g. thick-slice stacks of one anatomy) when more than 1

    @property
    def options_type(self) -> type:
        """The task's options as a frozen dataclass whose fields are the spec's option names and defaults: what its
        runner takes (one per task, made once)."""
        made = _OPTIONS_TYPES.get(self.name)
        if made is None or [f.name for f in fields(made)] != [o.name for o in self.options]:
            cls_name = "".join(w.title() for w in self.name.split("_")) + "Options"
            made = make_dataclass(cls_name, [(o.name, Any, field(default=o.default)) for o in self.options], frozen=True)
            made.__doc__ = f"The options of the {self.name} task (medil_backend.task.TASKS[{self.name!r}])."
            _OPTIONS_TYPES[self.name] = made
        return made

    def run(self, ctx: RunContext, inputs, request: GridRequest, model: str | None, options: dict) -> TaskResult:
        """Run the task: its runner ``(ctx, inputs, request, model, options)`` (imported by name now), ``options`` made
        the task's :attr:`options_type` from checked values."""
        import importlib

        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)(ctx, inputs, request, model, self.options_type(**options))

    def output_paths(self, output: str, options: dict) -> dict[tuple[str, int], str]:
        """Every file a run writes, by (role, index): the output (or its numbered series) and each path option that is set."""
        from pathlib import Path

        from .io import _suffix

        count = int(options.get(self.series) or 1) if self.series else 0
        if count > 1:
            path = Path(output)
            suffix = _suffix(path)
            stem = path.name[: -len(suffix)] if suffix else path.name
            paths = {("sample", i): str(path.with_name(f"{stem}_{i:03d}{suffix}")) for i in range(count)}
        else:
            paths = {("sample" if self.series else "output", 0): output}
        for o in self.options:
            if o.path and options.get(o.name):
                paths[(o.name, 0)] = options[o.name]
        return paths

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

    def checked_options(self, values: dict, request: GridRequest | None = None) -> dict:
        """Every declared option from ``values`` (missing: the default), checked, and checked together
        (with the grid request); unknown names refused."""
        unknown = set(values) - {o.name for o in self.options}
        if unknown:
            raise MedILError(f"{self.name} has no option {', '.join(sorted(unknown))}")
        options = {o.name: o.check(values.get(o.name, o.default)) for o in self.options}
        if self.check is not None:
            self.check(options, request or GridRequest())
        return options

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "help": self.help,
            "needs_input": self.needs_input,
            "model_kind": self.model_kind,
            "label": self.label or self.name,
            "max_inputs": self.max_inputs,
            "model_when": {k: list(v) for k, v in self.model_when.items()},
            "options": [o.to_json() for o in self.options],
            "context": [o.to_json() for o in CONTEXT_OPTIONS],
            "grid_labels": dict(GRID_OPTION_LABELS),
            "measured": {k: v for k, v in MEASURED.items() if k == self.name or k.startswith(self.name + "_")},
        }


#: the settings every task shares (the run context and the output grid)
CONTEXT_OPTIONS: tuple[Option, ...] = (
    Option("device", str, "auto", "auto (CUDA when present), cpu or cuda", label="Device"),
    Option(
        "precision",
        str,
        "auto",
        "auto: bfloat16 on CUDA (and CPUs with native bf16) where exact enough, else float32;"
        " bfloat16 runs in float32 on a CPU without native bf16",
        label="Device",
        choices=("auto", "float32", "bfloat16"),
    ),  # fmt: skip
    Option(
        "max_memory",
        float,
        None,
        "peak memory of the job in GB (default 3)",
        label="Memory limit",
        low=0.0,
        low_open=True,
        high=1e6,
        metavar="GB",
    ),  # fmt: skip
)
GRID_OPTION_LABELS = {"spacing": "Spacing", "orientation": "Orientation", "fov": "Field of view", "like": "Reference volume"}

_SEED = dict(low=0, high=MAX_SEED, metavar="S")
_MODALITY = Option("modality", str, "auto", "auto: guessed from the DICOM tag or Hounsfield units, and said", label="Modality",
                   choices=("auto", "mri", "ct"))  # fmt: skip
_BACKGROUND = Option("background", float, None, "value outside the input's extent (default: 0 for MR, -1024 for CT)",
                     low=-1e20, high=1e20, metavar="V")  # fmt: skip
_DTYPE = Option("dtype", str, "float32", "output voxel type (input: rounded and clipped to the input's type)", choices=("float32", "input"))


def _measured_times() -> dict:
    """Each task's and method's seconds on a whole head, as the benchmarks measured them (``measured_times.json``,
    written from ``benchmarks/results`` by ``tools/measured_times.py``): the help quotes these, not typed figures."""
    import json
    from pathlib import Path

    path = Path(__file__).with_name("measured_times.json")
    return json.loads(path.read_text()) if path.exists() else {}


MEASURED = _measured_times()


def _seconds(*keys: str) -> str:
    """A measured time in words ("12 s", "4.3 min"), or "not measured"."""
    d = MEASURED
    for k in keys:
        d = d.get(k, {}) if isinstance(d, dict) else {}
    s = d.get("cpu_seconds") if isinstance(d, dict) else None
    if s is None:
        return "not measured"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def _gain(*keys: str) -> str:
    d = MEASURED
    for k in keys:
        d = d.get(k, {}) if isinstance(d, dict) else {}
    g = d.get("gain_over_bspline_db") if isinstance(d, dict) else None
    return f", {g:+.1f} dB over B-spline" if g is not None else ""


#: the runners, named (``module:function``) rather than imported: the task layer never imports the operations
#: (they import it), as the model registry names its runners
_RUNNERS = "medil_backend.ops.runners"


def _check_superres(options: dict, request: GridRequest) -> None:
    if options.get("uncertainty") and options["samples"] < 2:
        raise MedILError("an uncertainty map needs several samples: set samples to 2 or more", options=("samples",))
    budget = TIME_BUDGET_MIN if options["time_budget"] is None else options["time_budget"]  # several stacks: checked there
    check_sampling(options["method"], options["samples"], budget)
    check_seed(options["seed"], options["samples"])
    if options.get("preview") and (options["method"] != "adapt" or budget == 0):
        raise MedILError(
            "a preview is the quick result of adapt with a time budget; fast and a time budget of 0 are quick already: "
            "drop --preview, or use adapt with a time budget",
            options=("preview",),
        )


def _check_sample(options: dict, request: GridRequest) -> None:
    if options["native"] and (request.like is not None or request.spacing or request.orientation is not None):
        raise MedILError(
            "native spaces draw the spacing and orientation: drop the spacing, orientation and reference grid", options=("native",)
        )
    check_seed(options["seed"], options["n"])


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "reconstruct",
            "resample or reconstruct a volume onto any grid through a MedIL autoencoder (best for isotropic inputs; "
            f"a whole 1 mm head: {_seconds('reconstruct')} on 2 CPU cores, measured)",
            needs_input=True,
            model_kind="autoencoder",
            options=(_MODALITY, _BACKGROUND, _DTYPE),
            runner=f"{_RUNNERS}:run_reconstruct",
            label="Reconstruct / resample",
        ),
        TaskSpec(
            "superres",
            "super-resolve a thick-slice scan onto a finer grid (adapt: a network trained on this scan's own slices, "
            f"{_seconds('superres', 'adapt')} for a whole head from 4 mm slices on 2 CPU cores{_gain('superres', 'adapt')}; "
            f"fast: B-spline + data consistency, {_seconds('superres', 'fast')}); or several stacks of one "
            "anatomy in any orientations into one volume (registered, then jointly consistent with every stack; three "
            f"4 mm stacks of a head: adapt {_seconds('superres_several_stacks', 'adapt')}, "
            f"fast {_seconds('superres_several_stacks', 'fast')}); all measured",
            needs_input=True,
            model_kind="diffusion",
            options=(
                Option(
                    "method",
                    str,
                    "adapt",
                    "adapt (default): a network trained on this scan's own in-plane slices (several stacks: on all "
                    "of theirs, applied to each), then data consistency; fast: cubic B-spline, then data consistency "
                    f"({_seconds('superres', 'fast')} for a whole head); cycles: noise/denoise cycles through the "
                    "latent diffusion model (Patel et al.); inverse: the generative latent optimised so that the decoded volume, "
                    "acquired again, matches the input (InverseSR, decoder only)",
                    label="Method",
                    choices=SUPERRES_METHODS,
                ),
                Option(
                    "samples",
                    int,
                    1,
                    "adapt (one stack or several): K networks (seeds); cycles, inverse: K runs; the output is their mean",
                    label="Samples",
                    low=1,
                    high=50,
                    metavar="K",
                ),
                Option(
                    "uncertainty", str, None, "with --samples K > 1: write the per-voxel standard deviation here", metavar="FILE", path=True
                ),
                Option(
                    "preview",
                    str,
                    None,
                    "adapt with a time budget: write the quick result (the pre-trained network alone, as --time-budget 0) "
                    "here as soon as it exists, then the full result; a cancelled run keeps it",
                    metavar="FILE",
                    path=True,
                ),
                Option(
                    "time_budget",
                    float,
                    None,
                    "adapt, inverse: minutes of training/optimisation in all (default 3); adapt with 0: the pre-trained "
                    "network alone, no test-time training (seconds); several stacks with one sample: default 0 (the "
                    "stacks together hold what adaptation would add; bench_multistack.py measures both)",
                    label="Time budget",
                    low=0.0,
                    high=24 * 60,
                    metavar="MIN",
                    stacks_default=default_time_budget("adapt", 2, 1),
                ),
                Option("seed", int, 0, "adapt, cycles, inverse: the first seed", **_SEED),
                Option("steps", int, 10, "cycles: DDIM steps per cycle (default 10)", label="Steps", low=1, high=1000, metavar="K"),
                Option(
                    "strength",
                    float,
                    0.3,
                    "cycles: how far each cycle noises, as a fraction of an unshifted cosine schedule (default 0.3)",
                    low=0.0,
                    low_open=True,
                    high=1.0,
                ),
                Option(
                    "slice_thickness",
                    float,
                    None,
                    "slice thickness in mm (default: the slice spacing)",
                    low=0.0,
                    low_open=True,
                    high=1e5,
                    metavar="MM",
                ),
                Option("slice_profile", str, "rect", "slice profile (gaussian: FWHM = thickness)", choices=("rect", "gaussian")),
                Option(
                    "iterations",
                    int,
                    None,
                    "data-consistency steps (default 2); several stacks: rounds of registration and joint reconstruction "
                    "(default 1; a second registers each stack again to the first round's volume)",
                    low=0,
                    high=100,
                ),
                Option(
                    "coverage",
                    str,
                    None,
                    "several stacks: write how many stacks constrain each voxel here",
                    metavar="FILE",
                    path=True,
                    stacks_only=True,
                ),
                Option(
                    "no_motion",
                    bool,
                    False,
                    "several stacks: they are aligned already (no registration between them)",
                    flag_only=True,
                    stacks_only=True,
                ),
                Option(
                    "slice_motion",
                    bool,
                    False,
                    "several stacks: also register every slice on its own to the volume (the patient moved during a "
                    "stack, e.g. between interleaved packages); slower",
                    flag_only=True,
                    stacks_only=True,
                ),
                _MODALITY,
                _BACKGROUND,
                _DTYPE,
            ),  # fmt: skip
            runner=f"{_RUNNERS}:run_superres",
            max_inputs=10,
            check=_check_superres,
            label="Super-resolve",
            model_when={"method": GENERATIVE_SUPERRES_METHODS},
        ),
        TaskSpec(
            "sample",
            "draw new volumes from a latent diffusion model onto any grid (AI-generated, marked as such; a research demo: "
            f"{_seconds('sample')} per 1 mm head on 2 CPU cores, measured)",
            needs_input=False,
            model_kind="diffusion",
            options=(
                Option("n", int, 1, "how many volumes (seeds SEED, SEED+1, ...)", label="Count", low=1, metavar="N"),
                Option("seed", int, 0, "the first seed (the same seed gives the same volume)", label="Seed", **_SEED),
                Option(
                    "steps", int, None, "DDIM denoising steps (default: the model card's)", label="Steps", low=1, high=100000, metavar="K"
                ),
                Option("eta", float, None, "DDIM stochasticity: 0 deterministic (default) .. 1 DDPM-like", low=0.0, high=1.0, metavar="E"),
                Option("native", bool, False, "draw each volume's spacing and orientation from the model's native spaces", flag_only=True),
                Option(
                    "background",
                    float,
                    None,
                    "value outside the model's trained space (default: 0 for MR, -1024 for CT)",
                    low=-1e20,
                    high=1e20,
                    metavar="V",
                ),
            ),  # fmt: skip
            label="Sample",
            runner=f"{_RUNNERS}:run_sample",
            series="n",
            check=_check_sample,
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise MedILError(f"task {name!r} is not known; tasks: {', '.join(TASKS)}") from None


def option_names() -> dict[str, str]:
    """Every option name of every task and of the run context -> its panel label ('' when none)."""
    names: dict[str, str] = {o.name: o.label for o in CONTEXT_OPTIONS}
    names.update(GRID_OPTION_LABELS)
    for spec in TASKS.values():
        for o in spec.options:
            names[o.name] = o.label or names.get(o.name, "")
    names.setdefault("overwrite", "Output volume")
    return names


def tasks_json() -> list[dict]:
    return [spec.to_json() for spec in TASKS.values()]


def run_task(
    name: str,
    volume: Volume | None = None,
    request: GridRequest | Grid | None = None,
    model: str | None = None,
    *,
    ctx: RunContext | None = None,
    **options,
) -> TaskResult:
    """The Python API's one entry: run task ``name`` (see :data:`TASKS`) with checked options."""
    spec = get_task(name)
    if spec.needs_input and volume is None:
        raise MedILError(f"the {name} task needs an input volume")
    if isinstance(request, Grid):
        request = GridRequest(like=request)
    ctx = ctx or RunContext.resolve()
    request = (request or GridRequest()).check()
    return spec.run(ctx, volume, request, model, spec.checked_options(options, request))


__all__ = [
    "CONTEXT_OPTIONS",
    "GENERATIVE_SUPERRES_METHODS",
    "SUPERRES_METHODS",
    "GridRequest",
    "ModelRef",
    "Option",
    "Output",
    "Provenance",
    "RunContext",
    "TASKS",
    "TaskResult",
    "TaskSpec",
    "get_task",
    "option_names",
    "run_task",
    "tasks_json",
]
