"""Architecture registry: a model card names its architecture; the registry builds the network and runs it.

Each :class:`Architecture` brings its config type, its network, a *runner* (how the network
reconstructs a volume onto a grid, with every option the operations take) and the latent summary
written into its card. Adding an architecture is one :func:`register` call; nothing else
branches on network types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import MedILError


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[dict], nn.Module]  # card config -> network (untrained)
    #: "module:function" of the operation that reconstructs a volume with this network ((volume, target, net, *, device,
    #: progress, cancel, max_memory_gb, modality, precision, background) -> Volume); "" when it does not reconstruct.
    #: A name, not an import: models never import the operations (ops imports models, not the reverse)
    reconstruct: str
    latent: Callable[[nn.Module], dict]  # the card's latent summary: spacing_mm, channels, compression_vs_1mm
    tasks: tuple[str, ...] = ("reconstruct",)  # the tasks (medil_backend.task) whose models this architecture serves

    def runner(self) -> Callable[..., Any]:
        if "reconstruct" not in self.tasks or not self.reconstruct:
            commands = " and ".join(f"`medil {t}`" for t in self.tasks)
            raise MedILError(f"a {self.name} model does not reconstruct an input (it serves {commands}); choose an autoencoder model")
        import importlib

        module, _, function = self.reconstruct.partition(":")
        return getattr(importlib.import_module(module), function)


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.name] = arch
    return arch


def architectures() -> dict[str, Architecture]:
    _register_builtins()
    return dict(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    _register_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise MedILError(f"architecture {name!r} is not known to this version of MedIL (known: {known}); update medil-backend") from None


def architecture_of(net: nn.Module) -> Architecture:
    """The registered architecture of a network instance (by its class name, as cards record it)."""
    return get_architecture(type(net).__name__)


def run_model(volume, target, net: nn.Module, **options):
    """Reconstruct ``volume`` onto ``target`` with any registered network, passing every option to its runner."""
    return architecture_of(net).runner()(volume, target, net, **options)


# -- built-in architectures ----------------------------------------------------------------------------


def _medil_latent(net) -> dict:
    c = net.config
    out = {
        "spacing_mm": c.latent_spacing,
        "channels": c.latent_channels,
        "compression_vs_1mm": round(c.latent_spacing**3 / c.latent_channels, 2),
    }
    if hasattr(net, "latent_sha256"):  # an autoencoder (a diffusion model draws the latent of the one its card names)
        out["sha256"] = net.latent_sha256()
    return out


def _fixed_grid_latent(net) -> dict:
    c = net.config
    f = c.multiple * c.spacing  # a latent voxel spans 2^(levels-1) grid voxels
    return {"spacing_mm": f, "channels": c.latent_channels, "compression_vs_1mm": round(f**3 / c.latent_channels, 2)}


def _build_medil(config: dict) -> nn.Module:
    from ..nn.autoencoder import MedILAutoencoder, MedILConfig

    return MedILAutoencoder(MedILConfig.from_dict(config))


def _build_fixed_grid(config: dict) -> nn.Module:
    from ..nn.fixed_grid import FixedGridAutoencoder, FixedGridConfig

    return FixedGridAutoencoder(FixedGridConfig(**config))


def _build_diffusion(config: dict) -> nn.Module:
    from ..nn.diffusion import DiffusionConfig, LatentDiffusionUNet

    return LatentDiffusionUNet(DiffusionConfig.from_dict(config))


def _register_builtins() -> None:
    if _REGISTRY:
        return
    register(Architecture("MedILAutoencoder", _build_medil, "medil_backend.ops.reconstruct:reconstruct", _medil_latent))
    register(
        Architecture("FixedGridAutoencoder", _build_fixed_grid, "medil_backend.ops.fixed_grid:fixed_grid_reconstruct", _fixed_grid_latent)
    )
    register(Architecture("LatentDiffusionUNet", _build_diffusion, "", _medil_latent, tasks=("sample", "superres")))  # the latent it draws
