"""One memory plan for every task: the user's limit, what a call holds for its whole length, the
working memory left for tiles, and whether the output goes to a memory-mapped file instead.

Every task starts a :class:`MemoryPlan` from the limit and its output size, declares what it holds
(input, latents, data-consistency copies) with :meth:`MemoryPlan.hold`, and asks
:meth:`MemoryPlan.working_bytes` for what is left for its tiles: a job that cannot fit is refused
there, before any work, in the same words for every task. :meth:`MemoryPlan.summary` goes into the
provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MedILError
from ..limits import GB, check_memory_limit

#: what the interpreter and torch allocate on top of the tensors during a run (thread pools, allocator slack)
RUNTIME_OVERHEAD_BYTES = 224 * 2**20
#: an output volume larger than this share of the memory limit goes to a memory-mapped temporary file
SPILL_FRACTION = 0.4
#: the options a user changes to make a job fit
FIT_OPTIONS = ("max_memory", "spacing", "fov")


@dataclass
class MemoryPlan:
    budget_bytes: float
    held: dict[str, float] = field(default_factory=dict)
    spill: bool = False
    tiles: dict[str, int] = field(default_factory=dict)
    disk_bytes: float = 0.0  # spilled outputs: checked against the temporary folder's free space with the memory

    @classmethod
    def start(cls, max_memory_gb: float | None, output_voxels: int = 0, outputs: int = 1, *, spill_allowed: bool = True) -> MemoryPlan:
        """A plan under the user's limit (``None``: the default) for ``outputs`` float32 outputs of
        ``output_voxels`` voxels, held one at a time: in memory, or spilled to a temporary file when
        one would take more than :data:`SPILL_FRACTION` of the limit (:meth:`working_bytes` refuses them if the
        temporary folder's disk cannot hold them)."""
        plan = cls(check_memory_limit(max_memory_gb), {"runtime": float(RUNTIME_OVERHEAD_BYTES)})
        out_bytes = 4.0 * output_voxels
        plan.spill = spill_allowed and out_bytes > SPILL_FRACTION * plan.budget_bytes
        if out_bytes and not plan.spill:
            plan.hold("output", out_bytes)
        plan.disk_bytes = out_bytes * max(1, int(outputs)) if plan.spill else 0.0
        return plan

    def hold(self, name: str, nbytes: float) -> MemoryPlan:
        """Declare ``nbytes`` held for the whole call under ``name`` (added to what that name holds)."""
        self.held[name] = self.held.get(name, 0.0) + float(nbytes)
        return self

    @property
    def resident_bytes(self) -> float:
        return sum(self.held.values())

    def working_bytes(
        self,
        what: str = "the input, its latent and the output alone",
        options: tuple[str, ...] = FIT_OPTIONS,
        advice: str = "raise the memory limit, or choose a coarser output spacing or a smaller field of view",
    ) -> float:
        """The memory left for tiles; refuses (a user error: ``what`` needs about N GB, over the limit:
        ``advice``) when nothing is left."""
        work = self.budget_bytes - self.resident_bytes
        if work <= 0:
            raise MedILError(
                f"{what} need about {self.resident_bytes / GB:.1f} GB, over the memory limit ({self.budget_bytes / GB:.1f} GB): {advice}",
                options=options,
            )
        if self.disk_bytes:
            from .tiling import check_disk_space

            check_disk_space(self.disk_bytes)
        return work

    def summary(self) -> dict:
        return {
            "limit_gb": round(self.budget_bytes / GB, 3),
            "held_gb": {k: round(v / GB, 3) for k, v in self.held.items()},
            "output_on_disk": self.spill,
            **({"tiles": dict(self.tiles)} if self.tiles else {}),
        }
