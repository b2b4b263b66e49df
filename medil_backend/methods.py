"""Super-resolution's methods, as facts a frontend, the task spec and the operation share (no torch here).

One table, so that the spec's choices, which methods take a diffusion model, which draw several samples,
which take several stacks and every check on them come from the same rows. The operation's strategy for
each method lives in :mod:`medil_backend.ops.superres_methods` under the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MedILError


@dataclass(frozen=True)
class MethodFacts:
    """What a frontend and a check need to know of a super-resolution method."""

    name: str
    #: draws: several samples (seeds seed, seed + 1, ...) give a mean and an uncertainty map
    stochastic: bool
    #: runs through a latent diffusion model (a chosen model applies to it alone)
    uses_model: bool
    #: combines several stacks (the joint reconstruction) as well as one
    several_stacks: bool
    #: a time budget of 0 (the pre-trained network alone, no test-time work) is a setting of it
    quick: bool
    #: the options that apply to it beyond the ones every method takes
    options: tuple[str, ...] = ()


_DRAWS = ("samples", "seed")
METHOD_FACTS: dict[str, MethodFacts] = {
    f.name: f
    for f in (  # the default first; name, stochastic, uses_model, several_stacks, quick, options
        MethodFacts("adapt", True, False, True, True, (*_DRAWS, "time_budget")),
        MethodFacts("fast", False, False, True, False),
        MethodFacts("inverse", True, True, False, False, (*_DRAWS, "time_budget", "max_iterations", "model")),
        MethodFacts("cycles", True, True, False, False, (*_DRAWS, "steps", "strength", "model")),
    )
}

SUPERRES_METHODS = tuple(METHOD_FACTS)
#: the methods that run through a latent diffusion model (a chosen model applies to them alone)
GENERATIVE_SUPERRES_METHODS = tuple(f.name for f in METHOD_FACTS.values() if f.uses_model)
STOCHASTIC_SUPERRES_METHODS = tuple(f.name for f in METHOD_FACTS.values() if f.stochastic)
MULTISTACK_METHODS = tuple(f.name for f in METHOD_FACTS.values() if f.several_stacks)

#: the time budget of adapt and inverse when none is given (minutes; several stacks with one sample: 0, see
#: :func:`default_time_budget`)
TIME_BUDGET_MIN = 3.0


def default_time_budget(method: str, stacks: int, samples: int) -> float:
    """The time budget when none is given: :data:`TIME_BUDGET_MIN`, but 0 (the pre-trained network alone) for a method
    that has that setting on several stacks with one sample: there the stacks together hold what adaptation would
    add (bench_multistack.py measures the default and three minutes side by side); several samples need networks
    that differ."""
    return 0.0 if method_facts(method).quick and stacks > 1 and samples == 1 else TIME_BUDGET_MIN


def _words(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def method_facts(method: str) -> MethodFacts:
    """The facts of ``method``; an unknown method is refused with the list of known ones."""
    if method not in METHOD_FACTS:
        raise MedILError(
            f"super-resolution method {method!r} is not available; choose one of {', '.join(SUPERRES_METHODS)}", options=("method",)
        )
    return METHOD_FACTS[method]


def check_sampling(method: str, samples: int, time_budget_min: float) -> None:
    """The rules on samples and the time budget, for one stack and several: 1 to 50 samples, several only for a
    method that draws; a budget of 0 to 1440 minutes, 0 (the pre-trained network alone: one deterministic sample)
    only for a method that has that setting."""
    facts = method_facts(method)
    if not (isinstance(samples, int) and 1 <= samples <= 50):
        raise MedILError(f"samples must be a whole number from 1 to 50, got {samples!r}", options=("samples",))
    if samples > 1 and not facts.stochastic:
        raise MedILError(
            f"the {method} method is deterministic: several samples need the {_words(STOCHASTIC_SUPERRES_METHODS)} method",
            options=("samples", "method"),
        )
    try:
        budget_ok = 0 <= float(time_budget_min) <= 24 * 60  # NaN and infinity fail
    except (TypeError, ValueError):
        budget_ok = False
    if not budget_ok:
        raise MedILError(f"the time budget must be 0 to 1440 minutes, got {time_budget_min!r}", options=("time_budget",))
    if time_budget_min == 0 and not facts.quick:
        quick = [f.name for f in METHOD_FACTS.values() if f.quick]
        raise MedILError(
            f"a time budget of 0 (no test-time training) is a setting of the {_words(quick)} method", options=("time_budget", "method")
        )
    if time_budget_min == 0 and samples > 1:
        raise MedILError(
            "with a time budget of 0 the pre-trained network alone runs: it is deterministic, one sample", options=("samples",)
        )


def check_stack_count(method: str, stacks: int) -> None:
    """Several stacks only for a method that combines them."""
    if stacks > 1 and not method_facts(method).several_stacks:
        raise MedILError(
            f"the {method} method takes one stack; several stacks run the joint reconstruction (method {_words(MULTISTACK_METHODS)})",
            options=("method",),
        )
