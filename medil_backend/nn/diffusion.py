"""Latent diffusion on a MedIL latent grid, conditioned on that grid's geometry (Patel et al., MIDL 2024).

A MedIL latent lives on a world-space grid (the autoencoder's latent spacing, any orientation and
field of view), so one diffusion model can draw a latent for *any* grid, and the autoencoder
decodes it onto any output grid. The network learns where it is from **geometry channels**
concatenated to its input:

- three **coordinate channels**: each latent voxel's world position (RAS, mm) scaled to [0, 1] over
  the model's *group space* (``group_lo`` .. ``group_hi``), so a smaller field of view is a
  smaller coordinate range and an orientation is a rotated coordinate field;
- three **spacing channels**: the spacing of the acquisition the latent depicts, along the latent
  grid's axes, divided by ``spacing_scale_mm`` (1 mm isotropic draws a high-resolution head; a
  6 mm through-plane spacing one that looks like a thick-slice scan, as encoded from one).

The denoiser is a small 3D UNet (residual blocks with group norm and a sinusoidal time embedding,
self-attention at the coarsest level), trained DDPM-style with v-prediction on a cosine noise
schedule and sampled with deterministic DDIM in any number of steps. Latents are standardised
by statistics of the training latents, stored as buffers with the weights: one mean and std per
channel, or (``standardise="position"``) mean and std *maps* over the group space. With maps the
network diffuses each latent's residual from the mean head where it lies, scaled by how much the
training heads vary there (a data-dependent prior, as in PriorGrad, Lee et al. 2022): background
stays background and the head's layout is given, so the network spends its capacity on what
varies between heads.

A latent too large for one pass (a wide field of view under a memory limit) is denoised
**patch-wise** (as 3D MedDiffusion does in latent space): at every step the network runs on
overlapping :class:`Windows`, each with its own geometry channels (so each window knows where it
lies in the group space), and the predictions are blended with weights that fall off towards each
window's faces, before the one DDIM update of the whole latent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import Grid

#: geometry channels: 3 coordinates + 3 spacings
COND_CHANNELS = 6


@dataclass
class DiffusionConfig:
    latent_channels: int = 4
    channels: Sequence[int] = (32, 64, 96)
    groups: int = 8
    time_dim: int = 128
    attention: bool = True
    timesteps: int = 1000
    prediction: str = "v"
    group_lo: Sequence[float] = (-120.0, -120.0, -120.0)
    group_hi: Sequence[float] = (120.0, 120.0, 120.0)
    spacing_scale_mm: float = 10.0
    latent_spacing: float = 4.0
    #: the cosine schedule's signal-to-noise ratio divided by ``noise_shift``² at every step (Hoogeboom et al. 2023,
    #: "simple diffusion"): a latent of many voxels keeps its coarse layout under noise that hides each voxel, so a larger
    #: shift spends more of training and sampling at the noise levels where a head's size and pose are decided
    noise_shift: float = 1.0
    #: the shift at the low-noise end: if set, log(shift) runs linearly from log(noise_shift_low) at step 0 to
    #: log(noise_shift) at step T (Hoogeboom et al.'s "shifted interpolated" schedule), so a voxel's detail is decided
    #: over as many steps as without a shift while the layout keeps the shifted noise levels; None: noise_shift throughout
    noise_shift_low: float | None = None
    #: "channel": standardise each latent channel by one mean and std; "position": by a mean and std map over the group
    #: space (a latent voxel's statistics where it lies), so the network learns the residual from the mean head
    standardise: str = "channel"
    extra: dict = field(default_factory=dict)

    def map_shape(self) -> tuple[int, int, int]:
        """Voxels a side of the position maps: the group space at the latent spacing, both faces included."""
        return tuple(int(round((b - a) / self.latent_spacing)) + 1 for a, b in zip(self.group_lo, self.group_hi))

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("channels", "group_lo", "group_hi"):
            d[key] = list(d[key])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown diffusion config keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("channels", "group_lo", "group_hi"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


# -- geometry conditioning ----------------------------------------------------------------------------


def source_spacing_along(grid: Grid, source_direction: np.ndarray, source_spacing: Sequence[float]) -> np.ndarray:
    """The spacing of an acquisition (``source_direction`` columns, ``source_spacing`` mm) along each axis of ``grid``.

    Along a unit vector u the acquisition's sampling interval is sqrt(sum_j (u . d_j)^2 s_j^2):
    the axis spacings when the grids are aligned, a blend when they are rotated.
    """
    proj = grid.direction.T @ np.asarray(source_direction, dtype=np.float64)  # (latent axis, source axis)
    return np.sqrt((proj**2) @ np.asarray(source_spacing, dtype=np.float64) ** 2)


def geometry_channels(grid: Grid, spacing_mm: Sequence[float], config: DiffusionConfig) -> torch.Tensor:
    """(6, *grid.shape) float32: world coordinates scaled to [0, 1] over the group space, then the spacing channels."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.shape], indexing="ij"), axis=-1)
    world = idx.reshape(-1, 3) @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    lo, hi = np.asarray(config.group_lo, dtype=np.float64), np.asarray(config.group_hi, dtype=np.float64)
    coords = ((world - lo) / (hi - lo)).T.reshape(3, *grid.shape)
    sp = np.broadcast_to((np.asarray(spacing_mm, dtype=np.float64) / config.spacing_scale_mm)[:, None, None, None], (3, *grid.shape))
    return torch.from_numpy(np.concatenate([coords, sp]).astype(np.float32))


def group_overlap(grid: Grid, config: DiffusionConfig) -> float:
    """The fraction of ``grid``'s bounding box (world RAS) that lies inside the model's group space."""
    lo, hi = grid.extent()
    glo, ghi = np.asarray(config.group_lo), np.asarray(config.group_hi)
    inter = np.clip(np.minimum(hi, ghi) - np.maximum(lo, glo), 0, None)
    return float(np.prod(inter) / max(np.prod(hi - lo), 1e-9))


# -- patch-wise denoising -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    """Overlapping windows of at most ``size`` voxels along each axis that cover a latent of ``shape``;
    neighbours share at least ``overlap`` voxels, over which their predictions are blended."""

    shape: tuple[int, int, int]
    size: int
    overlap: int

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"the overlap ({self.overlap}) must be below the window size ({self.size})")

    def slices(self) -> list[tuple[slice, slice, slice]]:
        axes = []
        for n in self.shape:
            if n <= self.size:
                axes.append([slice(0, n)])
                continue
            k = math.ceil((n - self.overlap) / (self.size - self.overlap))  # evenly spread, sharing >= overlap
            starts = [round(i * (n - self.size) / (k - 1)) for i in range(k)]
            axes.append([slice(a, a + self.size) for a in starts])
        return [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]

    def weight(self, shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
        """(1, 1, *shape): 1 inside a window, falling linearly towards its faces over ``overlap`` voxels
        (never to 0, so a voxel only one window covers keeps that window's prediction)."""
        w = torch.ones((1, 1, *shape), device=device, dtype=dtype)
        for axis, n in enumerate(shape):
            d = torch.arange(n, device=device, dtype=dtype)
            ramp = ((torch.minimum(d, n - 1 - d) + 1) / (self.overlap + 1)).clamp(max=1)
            w = w * ramp.view([-1 if i == axis + 2 else 1 for i in range(5)])
        return w


# -- noise schedule -----------------------------------------------------------------------------------


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008, shift: float = 1.0, shift_low: float | None = None) -> torch.Tensor:
    """ᾱ_t of the cosine schedule (Nichol & Dhariwal 2021), t = 0 .. T-1, float64; with ``shift`` > 1 its
    signal-to-noise ratio ᾱ/(1-ᾱ) divided by ``shift``² at every step (log-SNR shifted by -2 log ``shift``). With
    ``shift_low``, the log of the shift runs linearly from ``shift_low`` (low noise) to ``shift`` at t = T."""
    for value in (shift, shift if shift_low is None else shift_low):
        if value <= 0:
            raise ValueError(f"the noise shift must be positive, not {value}")
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    a = torch.cumprod(1 - betas, 0)
    low = shift if shift_low is None else float(shift_low)
    if shift == 1.0 and low == 1.0:
        return a
    log_shift = math.log(low) + (math.log(shift) - math.log(low)) * t[1:]
    snr = a / (1 - a) * torch.exp(-2 * log_shift)
    return snr / (1 + snr)


# -- the denoiser --------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv3d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the voxels of the coarsest level (global context for a whole head)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.out = nn.Conv3d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, -1).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(h.transpose(-1, -2).reshape(x.shape))


def _same_schedule(net: LatentDiffusionUNet, incompatible_keys) -> None:
    """After loading weights: their noise schedule must be the config's (a card edited to another ``noise_shift``
    would otherwise sample on the file's schedule while saying it uses another)."""
    c = net.config
    expected = cosine_alphas_cumprod(c.timesteps, shift=c.noise_shift, shift_low=c.noise_shift_low).float()
    if not torch.allclose(net.alphas_cumprod.cpu().float(), expected, rtol=1e-5, atol=1e-7):
        low = "" if c.noise_shift_low is None else f" (from {c.noise_shift_low} at low noise)"
        raise ValueError(f"the weights' noise schedule is not that of noise_shift {c.noise_shift}{low}")


class LatentDiffusionUNet(nn.Module):
    """ε/v-predicting 3D UNet on a standardised MedIL latent with geometry channels.

    ``forward(z_t, t, cond)``: ``z_t`` (B, C, *S) the noisy standardised latent, ``t`` (B,) integer
    steps, ``cond`` (B, 6, *S) from :func:`geometry_channels`; any spatial size (padded inside to a
    multiple of the UNet's stride, cropped back).
    """

    def __init__(self, config: DiffusionConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or DiffusionConfig()
        if c.prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be v or eps, not {c.prediction!r}")
        if c.standardise not in ("channel", "position"):
            raise ValueError(f"standardise must be channel or position, not {c.standardise!r}")
        ch, g, td = list(c.channels), c.groups, c.time_dim
        self.register_buffer("latent_mean", torch.zeros(c.latent_channels))
        self.register_buffer("latent_std", torch.ones(c.latent_channels))
        if c.standardise == "position":
            self.register_buffer("mean_map", torch.zeros(c.latent_channels, *c.map_shape()))
            self.register_buffer("std_map", torch.ones(c.latent_channels, *c.map_shape()))
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(c.timesteps, shift=c.noise_shift, shift_low=c.noise_shift_low).float())
        self.register_load_state_dict_post_hook(_same_schedule)
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], td), nn.SiLU(), nn.Linear(td, td))
        self.stem = nn.Conv3d(c.latent_channels + COND_CHANNELS, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, cout in enumerate(ch):
            self.down.append(ResBlock(ch[i - 1] if i else ch[0], cout, td, g))
            if i < len(ch) - 1:
                self.downsample.append(nn.Conv3d(cout, cout, 3, stride=2, padding=1))
        self.mid1 = ResBlock(ch[-1], ch[-1], td, g)
        self.attn = Attention(ch[-1], g) if c.attention else nn.Identity()
        self.mid2 = ResBlock(ch[-1], ch[-1], td, g)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(ch))):
            c_below = ch[-1] if i == len(ch) - 1 else ch[i + 1]
            if i < len(ch) - 1:
                self.upsample.append(nn.Conv3d(c_below, ch[i], 3, padding=1))
                c_below = ch[i]
            self.up.append(ResBlock(c_below + ch[i], ch[i], td, g))
        self.head = nn.Sequential(_norm(ch[0], g), nn.SiLU(), nn.Conv3d(ch[0], c.latent_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shape = z_t.shape[2:]
        s = self.stride
        pad = [p for n in reversed(shape) for p in (0, (-n) % s)]
        x = torch.cat([z_t, cond.to(z_t.dtype)], dim=1)
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        emb = self.time_mlp(timestep_embedding(t, self.config.channels[0]).to(x.dtype))
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for j, block in enumerate(self.up):
            skip = skips.pop()
            if j > 0:
                h = self.upsample[j - 1](F.interpolate(h, size=skip.shape[2:], mode="nearest"))
            h = block(torch.cat([h, skip], dim=1), emb)
        out = self.head(h)
        return out[:, :, : shape[0], : shape[1], : shape[2]]

    # -- latent standardisation ------------------------------------------------------------------------
    def latent_statistics(self, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std that standardise a latent whose geometry channels are ``cond``: per channel, or with
        ``standardise="position"`` read from the maps at each voxel's group-space coordinates (trilinear; the
        maps' faces beyond the group space)."""
        if self.config.standardise == "channel":
            return self.latent_mean.view(1, -1, 1, 1, 1), self.latent_std.view(1, -1, 1, 1, 1)
        if cond is None:
            raise ValueError("a position-standardised model needs the latent's geometry channels")
        # grid_sample reads (x, y, z) as (last, middle, first) map axis; the maps' axes are world R, A, S
        pts = (2 * cond[:, [2, 1, 0]].float() - 1).permute(0, 2, 3, 4, 1)
        maps = torch.cat([self.mean_map, self.std_map])[None].expand(cond.shape[0], -1, -1, -1, -1)
        stats = F.grid_sample(maps, pts, mode="bilinear", padding_mode="border", align_corners=True)
        C = self.config.latent_channels
        return stats[:, :C], stats[:, C:]

    def standardise(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = self.latent_statistics(cond)
        return (z - mean.to(z.dtype)) / std.to(z.dtype)

    def destandardise(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = self.latent_statistics(cond)
        return z * std.to(z.dtype) + mean.to(z.dtype)

    # -- training ----------------------------------------------------------------------------------------
    def training_loss(self, z0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM loss on standardised latents ``z0``: MSE of the predicted v (or ε) at a uniform random step."""
        B = z0.shape[0]
        t = torch.randint(0, self.config.timesteps, (B,), device=z0.device, generator=generator)
        noise = torch.randn(z0.shape, device=z0.device, generator=generator, dtype=z0.dtype)
        a = self.alphas_cumprod[t].view(B, 1, 1, 1, 1).to(z0.dtype)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * z0 if self.config.prediction == "v" else noise
        return F.mse_loss(self(z_t, t, cond).float(), target.float())

    # -- sampling ----------------------------------------------------------------------------------------
    def predict(self, z_t: torch.Tensor, t: int, cond: torch.Tensor, windows: Windows | None = None) -> torch.Tensor:
        """The network's output at step ``t``: in one pass, or blended over overlapping ``windows``."""
        tt = torch.full((z_t.shape[0],), t, device=z_t.device, dtype=torch.long)
        if windows is None:
            return self(z_t, tt, cond).to(z_t.dtype)
        acc = torch.zeros_like(z_t)
        total = z_t.new_zeros((1, 1, *z_t.shape[2:]))
        for sl in windows.slices():
            idx = (slice(None), slice(None), *sl)
            w = windows.weight(z_t[idx].shape[2:], z_t.device, z_t.dtype)
            acc[idx] += w * self(z_t[idx], tt, cond[idx]).to(z_t.dtype)
            total[idx] += w
        return acc / total

    def _x0_eps(self, z_t: torch.Tensor, t: int, cond: torch.Tensor, windows: Windows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[t].to(z_t.dtype)
        out = self.predict(z_t, t, cond, windows)
        if self.config.prediction == "v":
            return a.sqrt() * z_t - (1 - a).sqrt() * out, (1 - a).sqrt() * z_t + a.sqrt() * out
        x0 = (z_t - (1 - a).sqrt() * out) / a.sqrt()
        return x0, out

    def step_for_strength(self, strength: float) -> int:
        """The step (at least 1) whose noise level is the *unshifted* cosine schedule's at ``strength`` x T, so that
        "noise to strength s" (super-resolution cycles) corrupts a latent as much whatever the model's ``noise_shift``."""
        T = self.config.timesteps
        reference = cosine_alphas_cumprod(T)[int(round(strength * (T - 1)))]
        return max(1, int(torch.argmin((self.alphas_cumprod.double() - reference).abs())))

    def noised(self, z0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """q(z_t | z_0) for a standardised latent: the forward process to step ``t``."""
        a = self.alphas_cumprod[t].to(z0.dtype)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def ddim(
        self,
        z_t: torch.Tensor,
        cond: torch.Tensor,
        steps: int,
        start: int | None = None,
        callback: Callable[[int, int], None] | None = None,
        windows: Windows | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM from step ``start`` (default T-1) down to 0 in ``steps`` steps; standardised latents in and out;
        patch-wise over ``windows`` if given. ``eta`` = 0 is deterministic; ``eta`` = 1 adds the fresh noise of
        ancestral (DDPM-like) sampling at every step, drawn on the CPU from ``generator``."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be between 0 and 1, not {eta}")
        start = self.config.timesteps - 1 if start is None else int(start)
        steps = max(1, min(int(steps), start + 1))
        ts = np.unique(np.linspace(0, start, steps).round().astype(int))[::-1]
        x = z_t
        for i, t in enumerate(ts):
            x0, eps = self._x0_eps(x, int(t), cond, windows)
            if i + 1 < len(ts):
                a, a_prev = self.alphas_cumprod[int(t)].to(x.dtype), self.alphas_cumprod[int(ts[i + 1])].to(x.dtype)
                sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
                if eta > 0:
                    x = x + sigma * torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
            else:
                x = x0
            if callback is not None:
                callback(i + 1, len(ts))
        return x
