"""``medil train --config CONFIG.yaml [overrides]``: LightningCLI over MedILLitModule + VolumeDataModule.

Everything about *how* to train (devices, precision, DDP, nodes, logging, checkpoints) is a
Trainer flag in the YAML, e.g. for 8 GPUs on 2 nodes::

    trainer:
      accelerator: gpu
      devices: 4
      num_nodes: 2
      strategy: ddp
      precision: bf16-mixed

Resume with ``--ckpt_path path/to/last.ckpt``. The ``ExportWeights`` callback writes the best
checkpoint (by ``val/l1``) as safetensors + model card when the fit ends.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ..models import export_model
from .data import VolumeDataModule
from .lit import MedILLitModule


def training_card(*, description, tasks, datamodule, config_file, stage, steps_done, minutes, val_l1_best, **extra) -> dict:
    """The model card of a ``medil train`` run (``ExportWeights`` and ``medil export`` both write it)."""
    recipe = Path(config_file).read_text() if config_file and Path(config_file).exists() else None
    return {
        "description": description,
        "tasks": tasks or ["reconstruct", "superres"],
        "modality": datamodule.modality,
        "training": {
            "recipe": "medil train (LightningCLI)",
            "reproduce": f"medil train --config {Path(config_file).as_posix()}" if config_file else None,
            "config_yaml": recipe,
            "stage": stage,
            "steps_done": steps_done,
            "minutes": minutes,
            "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU",
            "torch": torch.__version__,
            "data": datamodule.manifest(),
            **extra,
        },
        "metrics": {"val_l1_best": val_l1_best},
    }


class ExportWeights(L.Callback):
    """Write ``NAME.safetensors`` + ``NAME.json`` (config, recipe, data manifest, hardware, metrics) at the end of fit."""

    def __init__(
        self, folder: str, name: str, description: str = "", tasks: list[str] | None = None, config_file: str | None = None
    ) -> None:
        self.folder, self.name, self.description = folder, name, description
        self.tasks = tasks or ["reconstruct", "superres"]
        self.config_file = config_file
        self.t0 = time.time()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.time()

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        # what is exported: the module's ``export_attr`` (default ``net``; the diffusion model exports its moving average)
        net = getattr(pl_module, getattr(pl_module, "export_attr", "net"))
        prefix = getattr(pl_module, "export_prefix", "net.")
        # the checkpoint that follows a validation metric (a timed or step checkpoint has no monitor and no "best")
        best = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path), None)
        best_score = None
        if best is not None:
            state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            net.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            best_score = float(best.best_model_score) if best.best_model_score is not None else None
        card = training_card(
            description=self.description,
            tasks=self.tasks,
            datamodule=trainer.datamodule,
            config_file=self.config_file,
            stage=pl_module.hparams.get("stage"),
            steps_done=trainer.global_step,
            minutes=round((time.time() - self.t0) / 60, 2),
            val_l1_best=best_score,
            devices=trainer.num_devices,
            num_nodes=trainer.num_nodes,
            precision=str(trainer.precision),
        )
        if best is not None and best.monitor != "val/l1":
            card["metrics"] = {f"{best.monitor.replace('/', '_')}_best": best_score}
        card.update(getattr(pl_module, "card_extra", dict)())
        path = export_model(net, self.folder, self.name, card)
        print(json.dumps({"exported": str(path)}), flush=True)


#: the hyper-parameters an exported network is built from (see :class:`MedILLitModule`)
EXPORT_HPARAMS = ("model", "stage", "fixed_grid")


def check_checkpoint(path: str) -> None:
    """Refuse a checkpoint to resume from that is missing, or that loads only by running pickled code."""
    import torch

    from ..errors import MedILError

    if not Path(path).is_file():
        raise MedILError(f"the checkpoint {path} does not exist; give the last.ckpt of an earlier medil train run")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise MedILError(
            f"{path} is not a checkpoint medil can load safely ({first}); give the last.ckpt of a medil train run "
            "(a checkpoint that needs arbitrary pickled code is refused)"
        ) from None


def _checked_checkpoint(ckpt, checkpoint: Path) -> dict:
    """The parts of an (untrusted) checkpoint that exporting reads, each checked to have the type it must have."""
    from ..errors import MedILError

    def bad(what: str) -> MedILError:
        return MedILError(f"{checkpoint} is not a Lightning checkpoint of medil train ({what}); give the checkpoint of a medil train run")

    if not isinstance(ckpt, dict):
        raise bad(f"it holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise bad("its state_dict is missing or not a dictionary of tensors")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise bad("its state_dict holds entries that are not named tensors")
    callbacks = ckpt.get("callbacks", {})
    if callbacks is None:
        callbacks = {}
    if not isinstance(callbacks, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in callbacks.items()):
        raise bad("its callbacks entry is not a dictionary of callback states")
    for v in callbacks.values():
        score = v.get("best_model_score")
        if score is not None and not (isinstance(score, (int, float)) or (isinstance(score, torch.Tensor) and score.numel() == 1)):
            raise bad("a callback's best_model_score is not a number")
    step = ckpt.get("global_step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad("its global_step is not a whole number")
    hparams = ckpt.get("hyper_parameters")
    if hparams is not None and not isinstance(hparams, dict):
        raise bad("its hyper_parameters are not a dictionary")
    return {**ckpt, "callbacks": callbacks, "global_step": step}


def export_checkpoint(
    checkpoint: str | Path, config: str | Path, folder: str | None = None, name: str | None = None, overwrite: bool = False
) -> Path:
    """Export a Lightning checkpoint of a ``medil train`` run (e.g. one that was stopped before its end)
    as safetensors + model card, the way ``ExportWeights`` does at the end of a fit.

    ``folder``, ``name`` and the description default to the config's ``ExportWeights`` callback."""
    import yaml

    from ..errors import MedILError

    checkpoint, config = Path(checkpoint), Path(config)
    for p in (checkpoint, config):
        if not p.is_file():
            raise MedILError(f"{p} does not exist")
    try:
        conf = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MedILError(f"{config} is not valid YAML ({str(exc).splitlines()[0]}); give the run's recipe") from None
    cb = next(
        (
            c.get("init_args", {})
            for c in conf.get("trainer", {}).get("callbacks", []) or []
            if str(c.get("class_path", "")).endswith("ExportWeights")
        ),
        {},
    )
    folder, name = folder or cb.get("folder"), name or cb.get("name")
    if not folder or not name:
        raise MedILError(f"{config} has no ExportWeights callback; give --folder and --name")
    if (Path(folder) / f"{name}.json").exists() and not overwrite:
        raise MedILError(f"model {name!r} already exists in {folder}; pass --overwrite to replace it, or choose another --name")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise MedILError(f"{checkpoint} is not a Lightning checkpoint of medil train ({first})") from None
    ckpt = _checked_checkpoint(ckpt, checkpoint)
    state = ckpt["state_dict"]
    hparams = ckpt.get("hyper_parameters") or conf.get("model") or {}  # the run's own (incl. command-line overrides)
    if not isinstance(hparams, dict):
        raise MedILError(f"{checkpoint} is not a Lightning checkpoint of medil train (no hyper-parameters)")
    # a run's version folder holds hparams.yaml from its start: the checkpoint's age relative to it is the training time
    start = checkpoint.parent.parent / "hparams.yaml"
    minutes = round((checkpoint.stat().st_mtime - start.stat().st_mtime) / 60, 2) if start.exists() else None
    score = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("ModelCheckpoint") and "best_model_score" in v), {})
    score = float(score["best_model_score"]) if score.get("best_model_score") is not None else None
    data = conf.get("data") or {}
    common = dict(description=cb.get("description", ""), tasks=cb.get("tasks"), config_file=config, exported_from=checkpoint.name)
    if isinstance(data, dict) and "autoencoder" in data:
        # the step count the card names is the recipe's as it is now (the models' figures were measured with it)
        recipe_model = conf.get("model") if isinstance(conf.get("model"), dict) else {}
        hparams = {**hparams, "sample_steps": recipe_model.get("sample_steps", hparams.get("sample_steps"))}
        return _export_diffusion(checkpoint, state, hparams, data, folder, name, common, int(ckpt.get("global_step", 0)), minutes, score)
    # a checkpoint is untrusted input: only the settings that shape the network are taken from it, and
    # nothing it names is imported (``perceptual`` names a module; exporting needs no loss)
    try:
        lit = MedILLitModule(**{k: v for k, v in hparams.items() if k in EXPORT_HPARAMS})
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MedILError(f"{checkpoint} does not describe a MedIL network ({first}); give the checkpoint of a medil train run") from None
    try:
        lit.net.load_state_dict({k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")})
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise MedILError(f"{checkpoint} does not match the network of {config} ({first}); give the checkpoint of that run") from None
    if isinstance(data, dict) and "heads" in data:
        from .heads import HeadDataModule

        dm = HeadDataModule(**{k: v for k, v in data.items() if k in ("heads", "tissue_maps", "val", "seed", "modality")})
    else:
        dm = VolumeDataModule(**{k: v for k, v in data.items() if k in ("train", "val", "modality", "synthetic", "tissue_maps")})
    dm.setup()
    card = training_card(
        **common, datamodule=dm, stage=lit.hparams.stage, steps_done=int(ckpt.get("global_step", 0)), minutes=minutes, val_l1_best=score
    )
    return export_model(lit.net, folder, name, card)


def _export_diffusion(checkpoint: Path, state: dict, hparams: dict, data: dict, folder, name, common: dict, steps, minutes, score) -> Path:
    """:func:`export_checkpoint` for a latent diffusion run: its moving average, with the card ``ExportWeights`` writes
    (the autoencoder and native spaces come from the run's latent cache)."""
    import inspect

    from ..errors import MedILError
    from ..ops.sample import DEFAULT_STEPS
    from .diffusion_lit import DiffusionLitModule, check_sample_steps
    from .latents import LatentDataModule

    asked = hparams.get("sample_steps")
    sample_steps = check_sample_steps(DEFAULT_STEPS if asked is None else asked)
    try:
        lit = DiffusionLitModule(model=hparams.get("model"), sample_steps=sample_steps)  # nothing else from the checkpoint: it is untrusted
        lit.ema.load_state_dict({k[len("ema.") :]: v for k, v in state.items() if k.startswith("ema.")})
    except (RuntimeError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MedILError(f"{checkpoint} does not describe a latent diffusion network ({first}); give the checkpoint of that run") from None
    accepted = set(inspect.signature(LatentDataModule).parameters)
    dm = LatentDataModule(**{k: v for k, v in data.items() if k in accepted})
    if not dm.cache.exists():
        raise MedILError(f"the run's latent cache {dm.cache} is missing: exporting reads the autoencoder and native spaces from it")
    dm.config = lit.ema.config
    dm.setup()
    lit.autoencoder_ref, lit.native_spaces = dm.autoencoder_ref, dm.meta.get("native_spaces")
    card = training_card(**common, datamodule=dm, stage=None, steps_done=steps, minutes=minutes, val_l1_best=score)
    card["metrics"] = {"val_loss_best": score}
    card.update(lit.card_extra())
    return export_model(lit.ema, folder, name, card)


class MedILCLI(LightningCLI):
    #: the validation metric the default checkpoint callback keeps the best of
    monitor = "val/l1"

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "trainer.callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"monitor": self.monitor, "mode": "min", "save_last": True},
                    },
                ],
                "trainer.max_epochs": 10,
            }
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            check_checkpoint(argv[i + 1])
        elif arg.startswith("--ckpt_path="):
            check_checkpoint(arg.split("=", 1)[1])
    if not argv or argv[0] not in ("fit", "validate", "--help", "-h", "--print_config"):
        argv = ["fit", *argv]
    if is_diffusion_recipe(argv):
        from .diffusion_lit import DiffusionLitModule
        from .latents import LatentDataModule

        DiffusionCLI(DiffusionLitModule, LatentDataModule, args=argv, save_config_kwargs={"overwrite": True}, seed_everything_default=0)
        return 0
    if recipe_data_has(argv, "heads"):
        from .heads import HeadDataModule

        MedILCLI(MedILLitModule, HeadDataModule, args=argv, save_config_kwargs={"overwrite": True}, seed_everything_default=0)
        return 0
    MedILCLI(MedILLitModule, VolumeDataModule, args=argv, save_config_kwargs={"overwrite": True}, seed_everything_default=0)
    return 0


def is_diffusion_recipe(argv: list[str]) -> bool:
    """A recipe whose ``data`` names an ``autoencoder`` trains a latent diffusion model (on that autoencoder's latents)."""
    return recipe_data_has(argv, "autoencoder")


def recipe_data_has(argv: list[str], key: str) -> bool:
    """Whether the recipe given by ``--config`` has ``key`` in its ``data`` block: ``autoencoder`` (a latent diffusion
    recipe) or ``heads`` (an autoencoder trained on heads made on the fly, :mod:`.heads`)."""
    import yaml

    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path and Path(path).is_file():
            try:
                conf = yaml.safe_load(Path(path).read_text()) or {}
            except yaml.YAMLError:
                return False
            if isinstance(conf, dict) and isinstance(conf.get("data"), dict) and key in conf["data"]:
                return True
    return False


class DiffusionCLI(MedILCLI):
    monitor = "val/loss"


if __name__ == "__main__":
    raise SystemExit(main())
