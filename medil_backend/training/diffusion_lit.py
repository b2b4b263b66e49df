"""Lightning module of the latent diffusion model (:mod:`medil_backend.nn.diffusion`).

DDPM training (v-prediction, cosine schedule) on standardised MedIL latents with their geometry
channels (:mod:`.latents`); AdamW; an exponential moving average of the weights (``ema``) is what
is validated, checkpointed and exported. Validation logs ``val/loss``: the diffusion loss on the
held-out volumes' latents at fixed steps and noise, so epochs compare.
"""

from __future__ import annotations

import copy

import lightning as L
import torch

from ..errors import MedILError
from ..nn.diffusion import DiffusionConfig, LatentDiffusionUNet
from ..ops.sample import DEFAULT_STEPS


def check_sample_steps(steps) -> int:
    """A recipe's ``model.sample_steps``: a whole number of at least 1 (refused before training, and before exporting)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MedILError(f"the recipe's model.sample_steps must be a whole number of at least 1, not {steps!r}")
    return steps


class DiffusionLitModule(L.LightningModule):
    """Args:
    model: the UNet's config (see :class:`~medil_backend.nn.diffusion.DiffusionConfig`); its
        ``latent_channels`` and ``latent_spacing`` must be the autoencoder's.
    lr, weight_decay: AdamW.
    ema_decay: decay of the weights' moving average (0: export the raw weights).
    init_weights: safetensors file to continue from (e.g. the bundled model); the noise schedule is this config's.
    cosine_steps: if > 0, a cosine learning-rate decay to 5 % over this many steps.
    sample_steps: the DDIM step count written in the card (``sampling.steps``): what ``medil sample`` uses unless told.
    """

    #: what ExportWeights exports, and the state-dict prefix it reads from the best checkpoint
    export_attr, export_prefix = "ema", "ema."

    def __init__(
        self,
        model: dict | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        init_weights: str | None = None,
        cosine_steps: int = 0,
        grad_clip: float = 1.0,
        sample_steps: int = DEFAULT_STEPS,
    ) -> None:
        super().__init__()
        check_sample_steps(sample_steps)
        self.save_hyperparameters()
        self.net = LatentDiffusionUNet(DiffusionConfig.from_dict(model or {}))
        #: whether the latent statistics come from the data (a fresh run, or one continued from a model without position maps)
        self.fit_statistics = True
        if init_weights:
            from safetensors.torch import load_file

            state = load_file(init_weights)
            state.pop("alphas_cumprod", None)  # the noise schedule is this run's config (its noise_shift may differ)
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"mean_map", "std_map", "alphas_cumprod"}:
                raise ValueError(f"{init_weights} does not fit this model: missing {missing}, unexpected {unexpected}")
            self.fit_statistics = bool(set(missing) & {"mean_map", "std_map"})
        self.ema = copy.deepcopy(self.net).requires_grad_(False)

    def setup(self, stage: str | None = None) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        dm.config = self.net.config
        dm.setup(stage)
        if self.fit_statistics:  # a continued run keeps the statistics it was trained with
            mean, std = dm.latent_stats()
            maps = dm.position_maps() if self.net.config.standardise == "position" else None
            for net in (self.net, self.ema):
                net.latent_mean.copy_(mean)
                net.latent_std.copy_(std)
                if maps is not None:
                    net.mean_map.copy_(maps[0])
                    net.std_map.copy_(maps[1])
        self.autoencoder_ref = dm.autoencoder_ref
        self.native_spaces = dm.meta.get("native_spaces")

    def card_extra(self) -> dict:
        """Top-level card fields: the autoencoder whose latents this model draws, its spaces, and its task."""
        c = self.net.config
        return {
            "autoencoder": getattr(self, "autoencoder_ref", None),
            "native_spaces": getattr(self, "native_spaces", None),
            "default_space": {"shape": [160, 224, 176], "spacing": [1.0, 1.0, 1.0], "centre": [0.0, 0.0, 0.0]},
            "group_space": {
                "box_ras_mm": [list(c.group_lo), list(c.group_hi)],
                "definition": "world RAS, each training head translated so that its foreground centroid is the origin",
            },
            "tasks": ["sample"],
            # the DDIM step count medil sample uses unless told (the one its figures were measured with)
            "sampling": {"steps": int(self.hparams.sample_steps)},
        }

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.net.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        if not h.cosine_steps:
            return opt
        import math

        def factor(step: int) -> float:
            t = min(step, h.cosine_steps) / h.cosine_steps
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, factor)]

    def training_step(self, batch, batch_idx):
        z0, cond = batch
        loss = self.net.training_loss(self.net.standardise(z0, cond), cond)
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip or None, gradient_clip_algorithm="norm")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        d = self.hparams.ema_decay
        with torch.no_grad():
            if d <= 0:
                self.ema.load_state_dict(self.net.state_dict())
                return
            # warm-up: early averages follow the weights closely (1 - d would freeze a fresh run at its init)
            d = min(d, (1 + self.global_step) / (10 + self.global_step))
            for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(p, 1 - d)

    def validation_step(self, batch, batch_idx):
        z0, cond = batch
        g = torch.Generator(device=z0.device).manual_seed(1000 + batch_idx)
        loss = self.ema.training_loss(self.ema.standardise(z0, cond), cond, generator=g)
        self.log("val/loss", loss, prog_bar=True, batch_size=z0.shape[0], sync_dist=True)
