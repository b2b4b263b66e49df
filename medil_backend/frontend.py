"""What every command-line frontend (``medil``, ``medil batch``) shares, below them both: how an output-grid request
is read from command-line values, and how a core error is told with the options that fix it."""

from __future__ import annotations

from .errors import MedILError

#: the batch command's own settings that a core error may name (spelled as the other options are)
BATCH_OPTION_NAMES = ("workers", "threads_per_worker", "retries", "scheduler", "participant_label", "resume")


def option_flags() -> dict[str, str]:
    """How the command line spells the settings that a core error names (MedILError.options): every option the task
    specs declare, the run context's, the output grid's and the batch's."""
    from .task import option_names

    return {name: "--" + name.replace("_", "-") for name in (*option_names(), *BATCH_OPTION_NAMES)}


def user_message(exc: MedILError) -> str:
    """The core's message plus the command-line options that fix it."""
    flags_of = option_flags()
    flags = [flags_of[o] for o in getattr(exc, "options", ()) if o in flags_of]
    return f"{exc} ({', '.join(flags)})" if flags else str(exc)


def parse_orientation(value: str | None):
    """``--orientation``: a code or ``input``/``aligned`` as given, or 9 comma-separated numbers as a 3x3 direction matrix."""
    if value is None or "," not in value:
        return value
    try:
        numbers = [float(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 9:
        raise MedILError("--orientation as a matrix takes 9 comma-separated numbers (row-major 3x3 direction matrix)")
    import numpy as np

    return np.array(numbers).reshape(3, 3)


def grid_request(spacing=None, orientation=None, fov=None, like=None):
    """An output-grid request from command-line values, checked; ``like``'s grid read from its header alone."""
    from .io import read_grid
    from .task import GridRequest

    request = GridRequest(spacing=spacing, orientation=parse_orientation(orientation), fov=fov)
    if like and request.given:
        raise MedILError("--like fixes the whole output grid; drop --spacing, --orientation and --fov, or drop --like", options=("like",))
    request.check()
    request.like = read_grid(like) if like else None
    return request
