"""Super-resolution's methods, as facts a frontend, the task spec and the operation share (no torch here).

One table, so that the spec's choices, which methods take a diffusion model and the operation's
dispatch come from the same names.
"""

from __future__ import annotations

SUPERRES_METHODS = ("adapt", "fast", "inverse", "cycles")  # the default first
#: the methods that run through a latent diffusion model (a chosen model applies to them alone)
GENERATIVE_SUPERRES_METHODS = ("inverse", "cycles")
