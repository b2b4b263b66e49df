"""Model cards: the bundled and user-installed models, loading them and exporting new ones.

A model is two files side by side: ``NAME.safetensors`` (the weights; never a pickle) and
``NAME.json`` (its model card: architecture config, tasks, training data and recipe, metrics,
and the weights' sha256, checked on every load). Models are looked up in the package's
``weights/`` folder, then in each folder of ``$MEDIL_MODELS`` (``os.pathsep``-separated), then
in ``~/.medil/models``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import MedILError
from .registry import architecture_of, get_architecture

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_MODELS = {"mri": "medil-brain-t1", "ct": "medil-ct"}
DEFAULT_MODEL = DEFAULT_MODELS["mri"]


def default_model_for(modality: str | None) -> str:
    """The bundled model used when none is named: the CT model for CT, the brain-MRI model otherwise."""
    return DEFAULT_MODELS.get(str(modality), DEFAULT_MODEL)


def user_model_dirs() -> list[Path]:
    env = os.environ.get("MEDIL_MODELS")
    dirs = [Path(p).expanduser() for p in env.split(os.pathsep) if p] if env else []
    return dirs + [Path("~/.medil/models").expanduser()]


def sha256_file(path: Path) -> str:
    """The sha256 of a regular file (a link, pipe or device is refused; size-capped)."""
    from ..files import MAX_WEIGHTS_BYTES, read_regular_file

    return hashlib.sha256(read_regular_file(path, MAX_WEIGHTS_BYTES, "weights file")).hexdigest()


def read_weights(path: Path, sha256: str, name: str) -> dict:
    """The tensors of a safetensors file, read once (a regular file, not a link, size-capped), checked
    against ``sha256`` and parsed from those same bytes."""
    from safetensors.torch import load

    from ..files import MAX_WEIGHTS_BYTES, read_regular_file

    data = read_regular_file(path, MAX_WEIGHTS_BYTES, "weights file")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise MedILError(f"the weights of model {name!r} do not match the sha256 in its card; the file is corrupt or was replaced")
    try:
        return load(data)
    except Exception as exc:
        raise MedILError(
            f"the weights of model {name!r} are not a readable safetensors file ({str(exc)[:120]}); reinstall the model"
        ) from None


@dataclass
class ModelEntry:
    name: str
    card_path: Path
    card: dict
    source: str  # "bundled" or "user"

    @property
    def weights_path(self) -> Path:
        """The weights file, which must lie beside the card: a card from elsewhere must not make the
        tool open (and hash) any file of this machine."""
        name = str(self.card.get("weights", f"{self.name}.safetensors"))
        if not name or name != Path(name).name or name in (".", "..") or "\\" in name:
            raise MedILError(
                f"the card {self.card_path} names its weights {name!r}; weights must be a file name beside the card "
                "(no folder): move the weights next to the card and name them in it"
            )
        return self.card_path.parent / name

    @property
    def tasks(self) -> list[str]:
        """The tasks this model serves: its architecture's (the registry's), not what its card once claimed."""
        try:
            return list(get_architecture(self.card.get("architecture", "MedILAutoencoder")).tasks)
        except MedILError:  # an architecture this version does not know: loading it will say so
            return list(self.card.get("tasks", ["reconstruct"]))


def build_network(card: dict) -> nn.Module:
    """The (untrained) network a card describes, built by its registered architecture."""
    return get_architecture(card.get("architecture", "MedILAutoencoder")).build(card["config"])


#: DDIM steps for a sampling model whose card names none (``sampling.steps``)
DEFAULT_SAMPLE_STEPS = 25


@dataclass
class LoadedModel:
    """A model ready to run: its network (sha256-checked weights), its card and, for a latent diffusion
    model, its ``companion``: the autoencoder whose latent space it draws (checked to be the one it was
    trained on). The one loaded-model type of every task."""

    name: str
    net: nn.Module
    card: dict
    sha256: str
    companion: LoadedModel | None = None

    # -- what the tasks read of a latent diffusion model ---------------------------------------------
    @property
    def diffusion(self) -> nn.Module:
        return self.net

    @property
    def autoencoder(self) -> nn.Module:
        if self.companion is None:
            raise MedILError(f"model {self.name!r} has no autoencoder: it is not a latent diffusion model")
        return self.companion.net

    @property
    def autoencoder_name(self) -> str | None:
        return self.companion.name if self.companion is not None else None

    @property
    def autoencoder_sha256(self) -> str | None:
        return self.companion.sha256 if self.companion is not None else None

    @property
    def modality(self) -> str:
        return str(self.card.get("modality", "mri"))

    @property
    def default_steps(self) -> int:
        """The DDIM step count this model was measured with (its card's ``sampling.steps``; else ``DEFAULT_SAMPLE_STEPS``)."""
        steps = (self.card.get("sampling") or {}).get("steps", DEFAULT_SAMPLE_STEPS)
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise MedILError(f"the card of {self.name!r} gives sampling.steps {steps!r}, not a whole number; fix the card or pass --steps")
        return steps

    def default_grid(self):
        """The output grid a sampling model draws onto by default (its card's ``default_space``)."""
        import numpy as np

        from ..geometry import Grid

        space = self.card.get("default_space") or {}
        shape = tuple(int(v) for v in space.get("shape", (160, 224, 176)))
        spacing = np.asarray(space.get("spacing", (1.0, 1.0, 1.0)), dtype=np.float64)
        direction = np.asarray(space.get("direction", np.eye(3)), dtype=np.float64)
        centre = np.asarray(space.get("centre", (0.0, 0.0, 0.0)), dtype=np.float64)
        origin = centre - direction @ (spacing * (np.asarray(shape) - 1) / 2)
        aff = np.eye(4)
        aff[:3, :3], aff[:3, 3] = direction * spacing, origin
        return Grid(shape, aff)

    def reconstruct(self, volume, target, **options):
        """Run this model's architecture on ``volume`` onto ``target`` (see :func:`~medil_backend.models.registry.run_model`)."""
        return architecture_of(self.net).runner()(volume, target, self.net, **options)


def _read_card(path: Path) -> dict:
    from ..files import read_json_file

    card = read_json_file(path, "model card")
    if not isinstance(card, dict) or "config" not in card:
        raise MedILError(f"{path} is not a MedIL model card (no 'config'); point at a model's .json card or its folder")
    return card


def list_models() -> list[ModelEntry]:
    """Every model found, bundled first; a user model with a bundled name is listed but shadowed."""
    entries: list[ModelEntry] = []
    for folder, source in [(BUNDLED_DIR, "bundled")] + [(d, "user") for d in user_model_dirs()]:
        if not folder.is_dir():
            continue
        for card_path in sorted(folder.glob("*.json")):
            try:
                card = _read_card(card_path)
            except MedILError:
                continue
            entries.append(ModelEntry(card.get("name", card_path.stem), card_path, card, source))
    return entries


def find_model(name_or_path: str | os.PathLike | None) -> ModelEntry:
    """A model by registry name, or by path to its card, its weights or its folder."""
    name = str(name_or_path or DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            cards = sorted(path.glob("*.json"))
            if len(cards) != 1:
                raise MedILError(f"{path} holds {len(cards)} model cards; point at one .json card")
            path = cards[0]
        elif path.suffix == ".safetensors":
            path = path.with_suffix(".json")
            if not path.exists():
                raise MedILError(
                    f"{path.with_suffix('.safetensors')} has no model card {path.name} beside it; export the model with its card"
                )
        elif path.suffix in (".ckpt", ".pt", ".pth", ".pkl"):
            raise MedILError(f"{path} is a pickle checkpoint, which MedIL never loads; export it with `medil export` to safetensors + card")
        card = _read_card(path)
        return ModelEntry(card.get("name", path.stem), path, card, "path")
    for entry in list_models():
        if entry.name == name:
            return entry
    known = ", ".join(e.name for e in list_models()) or "none"
    raise MedILError(f"unknown model {name!r}; known models: {known} (see `medil models`), or give a path to a model card")


def load_model(name_or_path: str | os.PathLike | None = None) -> LoadedModel:
    """Build the network from the card and load its safetensors weights after checking their sha256."""
    entry = find_model(name_or_path)
    wpath = entry.weights_path
    if not os.path.lexists(wpath):
        raise MedILError(f"the weights {wpath} of model {entry.name!r} are missing; reinstall the model")
    if not entry.card.get("sha256"):
        raise MedILError(
            f"the card {entry.card_path} has no sha256 of its weights, so they cannot be checked; re-export the model "
            "(`medil export`) or add the sha256 of its weights file"
        )
    digest = str(entry.card["sha256"])
    state = read_weights(wpath, digest, entry.name)
    try:
        net = build_network(entry.card)
        net.load_state_dict(state, strict=True)
    except MedILError:
        raise
    except Exception as exc:
        raise MedILError(
            f"model {entry.name!r} cannot be loaded ({str(exc).splitlines()[0][:200]}); its card and weights disagree"
        ) from None
    net.eval()
    companion = None
    ref = entry.card.get("autoencoder")
    if "sample" in get_architecture(entry.card.get("architecture", "MedILAutoencoder")).tasks:
        if not isinstance(ref, dict) or not ref.get("name"):
            raise MedILError(f"the card of {entry.name!r} names no autoencoder; re-export the model")
        companion = load_model(ref["name"])
        if not same_latent_space(ref, companion):
            raise MedILError(
                f"{entry.name!r} was trained on the latents of another {ref['name']!r} encoder (sha256 differs); "
                "install the autoencoder it was trained with, or retrain the diffusion model"
            )
    return LoadedModel(entry.name, net, entry.card, digest, companion)


def latent_space_ref(model: LoadedModel) -> dict:
    """What a latent diffusion model records of the autoencoder whose latents it learns: its name, the sha256
    of its weights file and that of its latent space (:meth:`MedILAutoencoder.latent_sha256`)."""
    return {"name": model.name, "sha256": model.sha256, "latent_sha256": model.net.latent_sha256()}


def same_latent_space(ref: dict, model: LoadedModel) -> bool:
    """Whether ``model`` encodes into the latent space that ``ref`` (:func:`latent_space_ref`) recorded: the
    same encoder side, whatever its decoder; a record without a latent sha256 needs the same weights file."""
    if ref.get("latent_sha256"):
        return ref["latent_sha256"] == model.net.latent_sha256()
    return not ref.get("sha256") or ref["sha256"] == model.sha256


def export_model(net: nn.Module, folder: str | os.PathLike, name: str, card: dict) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json`` (card completed with config, weights file and sha256)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wpath = folder / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    # written beside the targets and renamed into place: a failed export leaves no half-written model
    wtmp = folder / f".{name}.safetensors.part"
    save_file(state, str(wtmp))
    full = dict(card)
    c = net.config
    full.update(name=name, architecture=type(net).__name__, config=json.loads(c.to_json()), weights=wpath.name, sha256=sha256_file(wtmp))
    latent = architecture_of(net).latent(net)
    full.setdefault("latent", latent)
    card_path = folder / f"{name}.json"
    ctmp = folder / f".{name}.json.part"
    ctmp.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    os.replace(wtmp, wpath)
    os.replace(ctmp, card_path)
    return card_path
