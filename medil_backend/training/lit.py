"""Lightning module for the three MedIL training stages.

What is optimised lives here; devices, precision and DDP are Trainer flags (LightningCLI YAML).

- stage 1: global pretraining (the data module serves whole volumes on a standard grid);
- stage 2: native-resolution patches; from ``adv_start_step`` on, a patch adversarial loss
  (MONAI ``PatchDiscriminator``, least-squares GAN);
- stage 3: decoder-only fine-tuning (encoder and encoder LTE frozen).

Losses: L1 + ``kl_weight`` x KL (KL models) + ``adv_weight`` x adversarial + an optional
perceptual loss given as ``perceptual: "module.path:callable"`` (pluggable: no pretrained 3D
feature network can be downloaded here). Optimiser: AdamW. Validation logs ``val/l1``, on which
checkpoints are selected.

``fixed_grid`` trains the fixed-grid convolutional baseline instead (the paper's "Conv. LDM"
autoencoder, :mod:`medil_backend.nn.fixed_grid`) on the very same batches: each input is
resampled trilinearly onto the baseline's isotropic grid around the target patch, autoencoded
there, and resampled onto the target's native grid, where the loss is taken.
"""

from __future__ import annotations

import importlib

import lightning as L
import torch

from ..nn.autoencoder import MedILAutoencoder, MedILConfig
from ..nn.fixed_grid import FixedGridAutoencoder, FixedGridConfig
from ..nn.resample import sample_on_grids


def _load_callable(spec: str | None):
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class MedILLitModule(L.LightningModule):
    """Args:
    model: MedIL architecture config (see :class:`~medil_backend.nn.autoencoder.MedILConfig`).
    stage: 1, 2 or 3.
    lr, betas, weight_decay: AdamW (the paper: 5e-3, (0.9, 0.999), 0.01).
    kl_weight: weight of the KL term (KL models only).
    adv_weight, adv_start_step: patch adversarial loss weight and the step it starts at.
    perceptual, perceptual_weight: ``"module:callable"`` returning a perceptual loss of (pred, target).
    init_weights: safetensors file to start from (e.g. the previous stage's export).
    grad_clip: gradient-norm clipping of the autoencoder's updates (0: off).
    loss: the reconstruction loss, ``l1`` (the paper) or ``l2`` (mean squared error: what PSNR
        measures; large errors at edges outweigh the sign noise of many small ones).
    cosine_steps: if > 0, the learning rate follows a cosine from ``lr`` down to 5 % of it over
        this many steps (then stays there); 0 keeps it constant.
    fixed_grid: train the fixed-grid conv baseline with this config (see
        :class:`~medil_backend.nn.fixed_grid.FixedGridConfig`) instead of MedIL.
    posterior_sample: KL models decode mean + σε in training (the VAE); ``false`` decodes the
        mean (the KL term still bounds the latent's scale). A fresh posterior's σ ≈ 1 noise
        drowns the latent for hundreds of steps, too many for a CPU budget.
    """

    def __init__(
        self,
        model: dict | None = None,
        stage: int = 2,
        lr: float = 5e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        kl_weight: float = 1e-6,
        adv_weight: float = 0.0,
        adv_start_step: int = 0,
        perceptual: str | None = None,
        perceptual_weight: float = 0.0,
        init_weights: str | None = None,
        grad_clip: float = 1.0,
        fixed_grid: dict | None = None,
        cosine_steps: int = 0,
        loss: str = "l1",
        posterior_sample: bool = True,
    ) -> None:
        super().__init__()
        if loss not in ("l1", "l2"):
            raise ValueError(f"loss must be l1 or l2, not {loss!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        if fixed_grid is not None:
            self.net = FixedGridAutoencoder(FixedGridConfig(**fixed_grid))
        else:
            self.net = MedILAutoencoder(MedILConfig.from_dict(model or {}))
        if init_weights:
            from safetensors.torch import load_file

            self.net.load_state_dict(load_file(init_weights), strict=True)
        if stage == 3 and fixed_grid is None:
            for p in list(self.net.encoder.parameters()) + list(self.net.encoder_lte.parameters()):
                p.requires_grad_(False)
        self.perceptual_fn = _load_callable(perceptual)
        self.discriminator = None
        if adv_weight > 0:
            from monai.networks.nets import PatchDiscriminator

            self.discriminator = PatchDiscriminator(
                spatial_dims=3, num_layers_d=2, channels=16, in_channels=1, out_channels=1, norm="INSTANCE"
            )

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad]
        opts = [torch.optim.AdamW(params, lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)]
        if self.discriminator is not None:
            opts.append(
                torch.optim.AdamW(self.discriminator.parameters(), lr=h.lr * 0.5, betas=tuple(h.betas), weight_decay=h.weight_decay)
            )
        if not h.cosine_steps:
            return opts
        import math

        def factor(step: int) -> float:
            t = min(step, h.cosine_steps) / h.cosine_steps
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

        return opts, [torch.optim.lr_scheduler.LambdaLR(opts[0], factor)]

    def losses(self, batch, sample: bool) -> tuple[dict, torch.Tensor]:
        x, xg, y, og, zg = batch
        if isinstance(self.net, FixedGridAutoencoder):
            y_hat, mean, sigma = self._fixed_grid_forward(x, xg, og, sample)
            logvar = 2 * torch.log(sigma.clamp_min(1e-8))
        else:
            y_hat, _, mean, logvar = self.net(x, xg, zg, og, sample=sample)
        out = {"l1": (y_hat - y).abs().mean(), "l2": (y_hat - y).square().mean()}
        if mean is not None:
            out["kl"] = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        if self.perceptual_fn is not None and self.hparams.perceptual_weight > 0:
            out["perceptual"] = self.perceptual_fn(y_hat, y)
        return out, y_hat

    def _fixed_grid_forward(self, x, xg, og, sample: bool):
        from ..ops.fixed_grid import fixed_grid_for

        c = self.net.config
        work = [fixed_grid_for(g, c.spacing, c.multiple) for g in og]
        if len({w.shape for w in work}) != 1:
            raise ValueError("the target patches of a batch need equal shapes and spacings")
        y1, mean, sigma = self.net(sample_on_grids(x, xg, work), sample=sample)
        return sample_on_grids(y1, work, og), mean, sigma

    def training_step(self, batch, batch_idx):
        h = self.hparams
        opts = self.optimizers()
        opt_g = opts[0] if isinstance(opts, list) else opts
        parts, y_hat = self.losses(batch, sample=getattr(self.net.config, "kl", True) and h.posterior_sample)
        loss = parts[h.loss] + h.kl_weight * parts.get("kl", 0.0) + h.perceptual_weight * parts.get("perceptual", 0.0)
        use_adv = self.discriminator is not None and self.global_step >= h.adv_start_step
        if use_adv:
            parts["adv_g"] = ((self.discriminator(y_hat)[-1] - 1) ** 2).mean()
            loss = loss + h.adv_weight * parts["adv_g"]
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if h.grad_clip:
            self.clip_gradients(opt_g, gradient_clip_val=h.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        if h.cosine_steps:
            sched = self.lr_schedulers()
            (sched[0] if isinstance(sched, list) else sched).step()
        if use_adv:
            opt_d = opts[1]
            real = self.discriminator(batch[2])[-1]
            fake = self.discriminator(y_hat.detach())[-1]
            d_loss = 0.5 * (((real - 1) ** 2).mean() + (fake**2).mean())
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            parts["adv_d"] = d_loss
        bs = batch[0].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in parts.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        parts, _ = self.losses(batch, sample=False)
        self.log("val/l1", parts["l1"], prog_bar=True, batch_size=batch[0].shape[0], sync_dist=True)
        self.log("val/l2", parts["l2"], batch_size=batch[0].shape[0], sync_dist=True)
