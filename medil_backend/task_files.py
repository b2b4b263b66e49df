"""Run a task from files to files: the one path that the ``medil`` command, the batch workers and the
Slicer batch script share.

Every output file is declared (names, folders, clashes, existing files) before the input is read;
the result's files are committed together with one provenance record each, or none at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MedILError
from .task import GridRequest, Output, Provenance, RunContext, TaskResult, TaskSpec


@dataclass
class FilesRun:
    """A finished run: the task's result, the files it wrote (the main output first) and the input it read."""

    result: TaskResult
    written: list[Path] = field(default_factory=list)
    volume: Any = None


def run_task_to_files(
    spec: TaskSpec,
    input_path: str | list[str] | None,
    output: str,
    request: GridRequest,
    options: dict,
    ctx: RunContext,
    model: str | None = None,
    *,
    overwrite: bool = False,
    command: str = "",
    input_name: str | None = None,
    record: dict | None = None,
    on_written: Callable[[Output, Path], None] | None = None,
) -> FilesRun:
    """Run ``spec`` on the volume at ``input_path`` (checked ``options``, a checked ``request``) and write
    every output to the files :meth:`TaskSpec.output_paths` names, each with a JSON sidecar holding the
    provenance (plus ``record``). ``ctx.on_output`` is taken over: a series is staged as it is made, a preview
    committed as soon as it is made (``on_written`` is told of each file staged)."""
    from .io import OutputSet, read_volume

    outputs = OutputSet(overwrite)
    paths = {key: outputs.declare(path) for key, path in spec.output_paths(output, options).items()}
    if isinstance(input_path, (list, tuple)) and len(input_path) > 1:  # several inputs (stacks of one anatomy)
        if len(input_path) > spec.max_inputs:
            raise MedILError(f"{spec.name} takes at most {spec.max_inputs} inputs, not {len(input_path)}")
        volume = [read_volume(p, max_memory_gb=ctx.max_memory_gb) for p in input_path]
    else:
        if isinstance(input_path, (list, tuple)):
            input_path = input_path[0]
        volume = read_volume(input_path, max_memory_gb=ctx.max_memory_gb, name=input_name) if spec.needs_input else None
    extra = {**(record or {}), **({"command": command} if command else {})}

    previews: list = []

    def stage(out: Output) -> None:  # a series is written as it is made (its files are committed together at the end)
        path = paths[(out.role, out.index)]
        # the same record as every other output's (Provenance.record), the run's settings from the output itself
        streamed = Provenance(task=spec.name, models=[], grid=out.volume.grid, device=str(ctx.device), precision=ctx.precision)
        outputs.stage(out.volume, path, dtype=out.dtype, provenance=streamed.record(**out.record, **extra))
        if out.role == "preview":  # in place at once, and kept whatever happens to the full result
            previews.extend(outputs.commit())
        if on_written is not None:
            on_written(out, path)

    ctx.on_output = stage
    try:
        result = spec.run(ctx, volume, request, model, options)
        for out in result.outputs:
            path = paths[(out.role, out.index)]
            outputs.stage(out.volume, path, dtype=out.dtype, provenance=result.provenance.record(**out.record, **extra))
        outputs.commit()
    except BaseException:
        outputs.abort()
        raise
    return FilesRun(result, list(outputs.written) + previews, volume)


__all__ = ["FilesRun", "run_task_to_files"]
