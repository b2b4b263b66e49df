"""The fixed-grid convolutional baseline (the paper's "Conv. LDM" autoencoder).

MONAI's ``AutoencoderKL`` on a fixed isotropic grid (1 mm by default): the input is resampled
trilinearly onto that grid, encoded and decoded there, and the result resampled trilinearly
onto the output grid. It is what MedIL is compared against: same data, no world-space latent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class FixedGridConfig:
    spacing: float = 1.0
    channels: Sequence[int] = (16, 32, 32)
    latent_channels: int = 4
    num_res_blocks: int = 1
    norm_num_groups: int = 8

    def to_json(self) -> str:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return json.dumps(d, sort_keys=True)

    @property
    def multiple(self) -> int:
        """Grid sizes must be multiples of this (the autoencoder downsamples by 2 per level but the last)."""
        return 2 ** (len(self.channels) - 1)


class FixedGridAutoencoder(nn.Module):
    def __init__(self, config: FixedGridConfig | None = None) -> None:
        super().__init__()
        from monai.networks.nets import AutoencoderKL

        self.config = c = config or FixedGridConfig()
        self.ae = AutoencoderKL(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=tuple(c.channels),
            latent_channels=c.latent_channels,
            num_res_blocks=c.num_res_blocks,
            norm_num_groups=c.norm_num_groups,
            attention_levels=(False,) * len(c.channels),
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
        )

    def forward(self, x: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x on the fixed grid (sizes multiples of ``config.multiple``) -> (reconstruction, mean, sigma)."""
        mu, sigma = self.ae.encode(x)
        z = self.ae.sampling(mu, sigma) if sample else mu
        return self.ae.decode(z), mu, sigma
