"""The task contract: every declared option reaches the CLI, the panel and the runner; one handler,
one writer and one provenance shape for every task; every task's device plumbing runs on the CPU
(and, marked ``gpu``, on CUDA against the CPU result)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from medil_backend.cli import build_parser, main
from medil_backend.errors import MedILError
from medil_backend.frontend import option_flags
from medil_backend.io import read_volume
from medil_backend.task import CONTEXT_OPTIONS, TASKS, GridRequest, RunContext, option_names, run_task, tasks_json

sys.path.insert(0, str(REPO / "MedILSlicer"))

OPTIONS = [(spec.name, o.name) for spec in TASKS.values() for o in spec.options]


def _valid_value(o):
    """A value of option ``o`` other than its default, as the CLI would receive it."""
    if o.flag_only:
        return None
    if o.choices:
        return [c for c in o.choices if c != o.default][0]
    if o.path:
        return "u.nii.gz"
    if o.type is int:
        return int(o.high if o.high is not None and o.high < 10 else (o.low or 0) + 2)
    if o.type is float:
        return float(o.high if o.high is not None and o.high <= 1 else (o.low or 0) + 1.5)
    return "x"


def _argv(spec, extra):
    return [spec.name] + (["in.nii.gz"] if spec.needs_input else []) + ["out.nii.gz"] + extra


@pytest.mark.parametrize("task,name", OPTIONS)
def test_every_declared_option_reaches_the_cli_the_panel_and_the_runner(task, name):
    spec = TASKS[task]
    o = spec.option(name)
    value = _valid_value(o)
    args = build_parser().parse_args(_argv(spec, [o.flag] if o.flag_only else [o.flag, str(value)]))
    assert getattr(args, o.name) == (True if o.flag_only else value)  # the CLI
    companions = {"uncertainty": {"samples": 2}}.get(o.name, {})  # options checked together need their partner
    assert spec.checked_options({o.name: getattr(args, o.name), **companions})[o.name] == getattr(args, o.name)
    assert option_flags()[o.name] == o.flag  # an error naming it points at its flag
    # the runner takes the task's frozen options (the spec's names and defaults), and reads this one by name
    params = list(inspect.signature(inspect.unwrap(_runner(task))).parameters)
    assert params == ["ctx", "volume", "request", "model", "options"]
    made = spec.options_type(**spec.checked_options({o.name: getattr(args, o.name), **companions}))
    assert getattr(made, o.name) == getattr(args, o.name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(made, o.name, value)
    from medil_backend.ops import runners

    src = inspect.getsource(runners)  # read as an attribute, or named in a list of options handed on as they are
    assert re.search(rf"\b(o|options)\.{o.name}\b", src) or f'"{o.name}"' in src, f"no runner reads {o.name}"
    if o.label:  # the panel names it as the spec does, and the .ui has that field
        from MedILSlicerLib.jobs import panel_fields

        assert panel_fields()[o.name] == o.label
        assert f"<string>{o.label}:</string>" in (REPO / "MedILSlicer/Resources/UI/MedILSlicer.ui").read_text()


def _runner(task):
    from medil_backend.ops import runners

    return getattr(runners, f"run_{task}")


def test_every_runner_takes_exactly_its_declared_options():
    """Runners take (ctx, inputs, request, model, options); the options are the spec's, as a frozen dataclass."""
    for spec in TASKS.values():
        assert list(inspect.signature(_runner(spec.name)).parameters) == ["ctx", "volume", "request", "model", "options"]
        made = spec.options_type()
        assert [f.name for f in dataclasses.fields(made)] == [o.name for o in spec.options], spec.name
        assert {f.name: getattr(made, f.name) for f in dataclasses.fields(made)} == {o.name: o.default for o in spec.options}
        assert spec.options_type is spec.options_type  # made once


@pytest.mark.parametrize("task,name", [(t, o.name) for t, s in TASKS.items() for o in s.options if o.low is not None or o.choices])
def test_declared_ranges_are_refused_in_one_line_before_any_work(task, name, tmp_path, capsys):
    spec = TASKS[task]
    o = spec.option(name)
    if o.choices:
        bad = "nope"
    else:
        low = o.low - max(1, abs(o.low)) if not o.low_open else o.low
        bad = str(int(low) if o.type is int else float(low))
    if o.choices:  # argparse refuses a value outside the choices itself
        with pytest.raises(SystemExit):
            build_parser().parse_args(_argv(spec, [o.flag, bad]))
        capsys.readouterr()
        return
    argv = [spec.name] + ([str(tmp_path / "missing.nii.gz")] if spec.needs_input else []) + [str(tmp_path / "o.nii.gz"), o.flag, bad]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("medil: error:") == 1 and o.name.replace("_", " ") in err and o.flag in err, err
    assert "does not exist" not in err  # refused before the input is even read
    assert list(tmp_path.iterdir()) == []


def test_every_option_with_a_panel_label_is_a_panel_field():
    from MedILSlicerLib.jobs import panel_fields
    from MedILSlicerLib.tasks import GENERATIVE_SUPERRES_METHODS, SUPERRES_METHODS
    from MedILSlicerLib.tasks import TASKS as PANEL_TASKS

    from medil_backend.task import GENERATIVE_SUPERRES_METHODS as BACKEND_GENERATIVE

    labelled = {k: v for k, v in option_names().items() if v}
    assert labelled.items() <= panel_fields().items()
    assert [t.key for t in PANEL_TASKS] == list(TASKS)
    assert tuple(SUPERRES_METHODS) == TASKS["superres"].option("method").choices
    assert GENERATIVE_SUPERRES_METHODS == BACKEND_GENERATIVE
    assert {t.key: t.needs_input for t in PANEL_TASKS} == {s.name: s.needs_input for s in TASKS.values()}
    from MedILSlicerLib.tasks import THICK_RATIO, suggested_task

    from medil_backend.ops.superres import THICK_RATIO as BACKEND_THICK_RATIO

    assert THICK_RATIO == BACKEND_THICK_RATIO  # the panel suggests super-resolution exactly when the backend would run it
    assert suggested_task((2, 2, 3)) == "superres" and suggested_task((1, 1, 1.2)) == "reconstruct"


def test_the_bundled_task_specs_are_the_backends():
    """The extension's copy (used until the backend answers) is what ``medil tasks --json`` publishes: rerun
    ``python tools/gen_ui.py`` after changing a spec."""
    from MedILSlicerLib.tasks import BUNDLED_SPECS, read_specs

    assert read_specs(BUNDLED_SPECS) == json.loads(json.dumps(tasks_json()))
    assert "Resources/tasks.json" in (REPO / "MedILSlicer/CMakeLists.txt").read_text()  # packaged with the module


def test_the_panel_reads_a_backends_specs_at_run_time():
    """A task, a method or an option the backend publishes reaches the panel's catalog and the logic's arguments
    without an edit to the extension; the bundled catalog comes back afterwards."""
    from MedILSlicerLib import tasks as panel

    specs = json.loads(json.dumps(tasks_json()))
    superres = next(s for s in specs if s["name"] == "superres")
    method = next(o for o in superres["options"] if o["name"] == "method")
    method["choices"].append("newmethod")
    superres["model_when"]["method"].append("newmethod")
    specs.append({**specs[0], "name": "denoise", "label": "Denoise", "help": "remove noise (a test task)"})
    try:
        cat = panel.use_specs(specs)
        assert panel.catalog() is cat and cat.by_label("Denoise").key == "denoise"
        assert cat.choices("superres", "method")[0] == "adapt" and "newmethod" in cat.choices("superres", "method")
        assert cat.uses_model("superres", {"method": "newmethod"}) and not cat.uses_model("superres", {"method": "adapt"})
        assert cat.uses_model("reconstruct", {}) and cat.uses_model("sample", {})
        args = cat.option_arguments("superres", {"method": "fast", "samples": 2, "time_budget": 0.0, "n": 5, "modality": "auto"})
        assert args == ["--method", "fast", "--samples", "2", "--time-budget", "0.0"]  # defaults and other tasks' options left out
        parsed = build_parser().parse_args(["superres", "in.nii.gz", "out.nii.gz", *args])
        assert (parsed.method, parsed.samples, parsed.time_budget) == ("fast", 2, 0.0)
        assert cat.option_arguments("sample", {"n": 3, "seed": 7, "steps": None, "native": True}) == ["--n", "3", "--seed", "7", "--native"]
    finally:
        panel.use_specs(panel.read_specs())
    assert [t.key for t in panel.catalog().tasks] == list(TASKS)


def test_every_panel_option_widget_shows_a_published_option():
    from MedILSlicerLib.tasks import OPTION_WIDGETS

    ui = (REPO / "MedILSlicer/Resources/UI/MedILSlicer.ui").read_text()
    for (task, name), widget in OPTION_WIDGETS.items():
        assert TASKS[task].option(name).help and f'name="{widget}"' in ui


def test_tasks_json_publishes_the_specs(capsys):
    assert main(["tasks", "--json"]) == 0
    specs = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in specs] == list(TASKS) and specs == json.loads(json.dumps(tasks_json()))
    superres = next(s for s in specs if s["name"] == "superres")
    method = next(o for o in superres["options"] if o["name"] == "method")
    assert method["default"] == "adapt" and method["flag"] == "--method" and method["choices"][0] == "adapt"
    assert {o["name"] for o in superres["context"]} == {o.name for o in CONTEXT_OPTIONS}


def test_every_task_has_device_precision_and_memory_options():
    parser = build_parser()
    for spec in TASKS.values():
        args = parser.parse_args(_argv(spec, ["--device", "cpu", "--precision", "float32", "--max-memory", "2"]))
        assert (args.device, args.precision, args.max_memory) == ("cpu", "float32", 2.0)


def test_run_context_is_resolved_once_and_refuses_bad_settings():
    ctx = RunContext.resolve("cpu", "float32", 1.5)
    assert ctx.device.type == "cpu" and ctx.budget_bytes == 1.5 * 2**30
    for bad in ({"device": "tpu"}, {"precision": "fp8"}, {"max_memory_gb": -1}):
        with pytest.raises(MedILError):
            RunContext.resolve(**bad)
    if not torch.cuda.is_available():
        with pytest.raises(MedILError, match="CUDA"):
            RunContext.resolve("cuda")


def test_python_api_runs_every_input_task_with_one_provenance_shape(small_mri, model_dir):
    v = read_volume(small_mri)
    ctx = RunContext.resolve("cpu", "float32")
    rec = run_task("reconstruct", v, GridRequest(spacing=[3.0]), "tiny", ctx=ctx)
    sr = run_task("superres", v, None, None, ctx=ctx, method="fast")
    for result, task in ((rec, "reconstruct"), (sr, "superres")):
        record = result.provenance.record()
        assert record["task"] == task and record["device"] == "cpu" and record["version"]
        assert {"model", "model_sha256", "models", "precision"} <= set(record)
        assert result.outputs[0].role == "output" and np.isfinite(result.outputs[0].volume.array).all()
        memory = record["plan"]["memory"]  # one memory plan, recorded the same way by every task
        assert memory["limit_gb"] == 3.0 and memory["held_gb"]["runtime"] > 0 and memory["output_on_disk"] is False
    assert rec.provenance.models[0].name == "tiny" and len(rec.provenance.models[0].sha256) == 64
    with pytest.raises(MedILError, match="samples"):
        run_task("superres", v, None, None, ctx=ctx, method="fast", samples=0)


def test_every_task_refuses_a_memory_limit_it_cannot_fit_in_the_same_words(small_mri, model_dir, sampler_dir):
    """One memory plan: each task counts what it holds and refuses, before any work, saying what to change."""
    v = read_volume(small_mri)
    ctx = RunContext.resolve("cpu", "float32", 0.1)  # under the runtime's own overhead
    runs = {
        "reconstruct": lambda: run_task("reconstruct", v, GridRequest(spacing=[1.0]), "tiny", ctx=ctx),
        "superres": lambda: run_task("superres", v, None, None, ctx=ctx, method="fast"),
        "sample": lambda: run_task("sample", None, None, "tiny-ldm", ctx=ctx, steps=1),
    }
    for task, run in runs.items():
        with pytest.raises(MedILError, match=r"need about [0-9.]+ GB, over the memory limit \(0\.1 GB\): raise the memory limit") as e:
            run()
        assert "max_memory" in e.value.options, task


def test_adapt_records_its_prior_and_runs_on_the_chosen_device(small_mri):
    from medil_backend.ops.superres import superres

    v = read_volume(small_mri)
    out = superres(v, None, method="adapt", time_budget_min=0.05, device="cpu", precision="float32")
    assert out.meta["device"] == "cpu" and out.meta["precision"] == "float32"
    assert out.meta["models"] and out.meta["models"][0][0] == "prior-mri" and len(out.meta["models"][0][1]) == 64
    if not torch.cuda.is_available():
        with pytest.raises(MedILError, match="CUDA"):
            superres(v, None, method="fast", device="cuda")


def test_sample_streams_its_series_through_the_context(sampler_dir):
    ctx = RunContext.resolve("cpu")
    seen = []
    ctx.on_output = seen.append
    result = run_task("sample", None, None, "tiny-ldm", ctx=ctx, n=2, seed=3, steps=1)
    assert result.outputs == [] and [o.index for o in seen] == [0, 1] and [o.record["seed"] for o in seen] == [3, 4]
    assert result.provenance.seeds == [3, 4] and [m.role for m in result.provenance.models] == ["model", "autoencoder"]
    assert seen[0].record["precision"] == "float32"  # on the CPU, auto keeps float32 (as before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("task", ["reconstruct", "superres-fast", "superres-adapt", "sample"])
def test_every_task_on_cuda_matches_the_cpu(task, small_mri, model_dir, sampler_dir):
    """Each task on CUDA (float32, so the comparison is of the device path, not of bf16) against the CPU."""
    v = read_volume(small_mri)
    results = {}
    for device in ("cpu", "cuda"):
        ctx = RunContext.resolve(device, "float32")
        if task == "reconstruct":
            r = run_task("reconstruct", v, None, "tiny", ctx=ctx)
        elif task.startswith("superres"):
            method = task.split("-")[1]
            r = run_task("superres", v, None, None, ctx=ctx, method=method, time_budget=0.05 if method == "adapt" else 3.0, seed=1)
        else:
            r = run_task("sample", None, None, "tiny-ldm", ctx=ctx, n=1, seed=1, steps=2)
        results[device] = np.asarray(r.outputs[0].volume.array, dtype=np.float64)
    a, b = results["cpu"], results["cuda"]
    scale = max(1e-6, float(np.abs(a).max()))
    tol = 0.05 if task == "superres-adapt" else 1e-3  # adapt trains for a time budget: the step counts differ
    assert np.abs(a - b).mean() / scale < tol


def test_the_registry_says_which_tasks_an_architecture_serves(sampler_dir, small_mri):
    from medil_backend.models import architectures, load_model, run_model

    archs = architectures()
    assert archs["MedILAutoencoder"].tasks == ("reconstruct",) and "sample" in archs["LatentDiffusionUNet"].tasks
    for arch in archs.values():  # a runner is named, not imported: models never import the operations
        assert isinstance(arch.reconstruct, str)
    ldm = load_model("tiny-ldm")
    with pytest.raises(MedILError, match="does not reconstruct an input"):
        run_model(read_volume(small_mri), read_volume(small_mri).grid, ldm.net)
    import ast

    for path in (REPO / "medil_backend" / "models").glob("*.py"):  # no import of medil_backend.ops anywhere in models/
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("ops") and not (node.level == 2 and (node.module or "").startswith("ops")), path


def test_each_tasks_help_quotes_the_measured_times_not_typed_ones():
    """The seconds in the task help come from the benchmark results (tools/measured_times.py keeps the file in step)."""
    import subprocess
    import sys

    from medil_backend.task import MEASURED, TASKS

    r = subprocess.run([sys.executable, str(REPO / "tools" / "measured_times.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert f"{MEASURED['reconstruct']['cpu_seconds']:.0f} s" in TASKS["reconstruct"].help
    assert f"{MEASURED['superres']['adapt']['cpu_seconds'] / 60:.1f} min" in TASKS["superres"].help
    assert f"{MEASURED['sample']['cpu_seconds']:.0f} s" in TASKS["sample"].help
    assert TASKS["superres"].to_json()["measured"]["superres"]["fast"]["source"] == "benchmarks/results/bench_superres.json"
