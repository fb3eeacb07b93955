"""VAEs for small images, built from one config dataclass.

Both models map images `[B, C, H, W]` in [0, 1] to a diagonal Gaussian q(z|x)
(`mu, logvar` `[B, L]`) and latents `[B, L]` back to the decoder output
`[B, C, H, W]` of p(x|z): the logits of a Bernoulli or continuous Bernoulli, or
the mean of a Gaussian whose per-pixel log-variance is a parameter of the model
(`decoder_logvar`). The image shape comes from the dataset, never from a constant.
`forward` runs encode -> fused reparameterize+KL -> decode, so that
DistributedDataParallel (which only hooks `forward`) sees the whole pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

import fastvae

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian")  # fastvae's names
# Below this |logit| the continuous Bernoulli's mean is its Taylor series: the closed form cancels
# (1/l - 1/l), losing ~eps/|l|, while the series' first left-out term, l^7/1209600, is below 1e-7.
CB_MEAN_SERIES_BELOW = 0.7
# The learned Gaussian variance stops at the variance of the rounding to 8 bits, (1/255)^2 / 12 for
# pixels scaled to [0, 1]: finer than that the data says nothing, and a constant pixel would
# otherwise send its variance to 0 and its density to infinity.
MIN_DECODER_LOGVAR = -2 * math.log(255) - math.log(12)


@dataclass(frozen=True)
class VAEConfig:
    """Everything that fixes a model's parameter shapes.

    hidden_dims: MLP widths between the image and the latent (the conv model
    uses them between its conv stack and the latent); conv_channels: channels
    of the stride-2 convolutions, so H and W must be divisible by 2**len(conv_channels)."""

    arch: str = "mlp"
    image_shape: tuple[int, int, int] = (1, 28, 28)
    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (512, 256)
    conv_channels: tuple[int, ...] = (32, 64)
    conv_kernel: int = 4  # with stride 2 and padding 1, a 4x4 kernel halves H and W exactly
    likelihood: str = "bernoulli"  # checkpoints from before the choice existed are Bernoulli VAEs

    def __post_init__(self) -> None:
        # JSON round trips give lists; the config must stay hashable and comparable.
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
        self.validate()

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if any(width < 1 for width in self.hidden_dims + self.conv_channels):
            raise ValueError(f"layer widths must be >= 1, got hidden {self.hidden_dims}, conv {self.conv_channels}")
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if self.arch == "conv":
            factor = 2 ** len(self.conv_channels)
            _, height, width = self.image_shape
            if height % factor or width % factor:
                raise ValueError(
                    f"the conv VAE halves H and W {len(self.conv_channels)} times, so they must "
                    f"be divisible by {factor}; images are {height}x{width}: pass fewer conv channels"
                )

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(widths: list[int]) -> list[nn.Module]:
    """Linear+ReLU layers through `widths` (no activation after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return layers


class VAE(nn.Module):
    """Shared encode/forward logic and the likelihood; subclasses build `encoder` and `decoder`."""

    config: VAEConfig
    encoder: nn.Module  # [B, C, H, W] -> [B, 2L]
    decoder: nn.Module  # [B, L] -> [B, C, H, W]: logits, or the Gaussian's mean
    decoder_logvar: nn.Parameter | None  # the Gaussian's per-pixel log-variance [C, H, W]; None otherwise

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        # One variance per pixel, shared by all images and samples (it broadcasts over [B] and [K, B]);
        # 0: unit variance to start.
        logvar = nn.Parameter(torch.zeros(config.image_shape)) if config.likelihood == "gaussian" else None
        self.register_parameter("decoder_logvar", logvar)

    def decoder_log_variance(self) -> Tensor | None:
        """The Gaussian's per-pixel log-variance as the losses take it (None for the other likelihoods),
        floored at MIN_DECODER_LOGVAR: a pixel that never changes (an image's border) would otherwise
        drive its variance, and the density, without bound."""
        if self.decoder_logvar is None:
            return None
        return self.decoder_logvar.clamp_min(MIN_DECODER_LOGVAR)

    @property
    def likelihood(self) -> str:
        """p(x|z) by fastvae's name, what the losses take as likelihood=."""
        return self.config.likelihood

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, H, W] -> mu, logvar [B, L] (row views of one [B, 2L] output, no copy)."""
        return self.encoder(x).chunk(2, dim=1)

    def decode(self, z: Tensor) -> Tensor:
        """z [..., L] -> the decoder output [..., C, H, W]: logits, or the Gaussian's mean. Leading
        dims beyond the batch (K samples per image, [K, B, L]) go through the decoder as one batch."""
        if z.dim() == 2:
            return self.decoder(z)
        return self.decoder(z.flatten(0, -2)).unflatten(0, z.shape[:-1])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, C, H, W] -> decoder output [B, C, H, W], mu, logvar [B, L], kl [B] (float32).

        z ~ q(z|x) and its KL to N(0, I) come from one fused fastvae op."""
        mu, logvar = self.encode(x)
        z, kl = fastvae.reparameterize_kl(mu, logvar)
        return self.decode(z), mu, logvar, kl

    def log_likelihood(self, decoded: Tensor, x: Tensor, reduction: str = "batchmean") -> Tensor:
        """log p(x|z) of the model's likelihood for the decoder output on z, reduced as fastvae's
        likelihood functions reduce ("none", "sum", "mean", "batchmean")."""
        if self.likelihood == "gaussian":
            return fastvae.gaussian_log_likelihood(decoded, x, self.decoder_log_variance(), reduction=reduction)
        if self.likelihood == "continuous_bernoulli":
            return fastvae.continuous_bernoulli_log_likelihood(decoded, x, reduction=reduction)
        return fastvae.bernoulli_log_likelihood(decoded, x, reduction=reduction)

    def likelihood_mean(self, decoded: Tensor) -> Tensor:
        """E[x|z] of p(x|z) for the decoder output on z, float32 (float64 for float64): what a picture
        of the model shows. The Gaussian's is its mean, which may leave [0, 1]."""
        out = decoded.double() if decoded.dtype == torch.float64 else decoded.float()
        if self.likelihood == "gaussian":
            return out
        if self.likelihood == "continuous_bernoulli":
            return continuous_bernoulli_mean(out)
        return torch.sigmoid(out)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws from the prior decoded to the likelihood's mean [n, C, H, W] (likelihood_mean)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.config.latent_dim, generator=generator).to(device)
        return self.likelihood_mean(self.decode(z))


def continuous_bernoulli_mean(logits: Tensor) -> Tensor:
    """The mean of the continuous Bernoulli with these logits l: 1 / (1 - exp(-l)) - 1 / l (1/2 at l = 0),
    accurate for every finite l: the Taylor series 1/2 + l/12 - l^3/720 + l^5/30240 near 0, where the closed
    form is a difference of two numbers near 1/l; -1/expm1(-l) elsewhere, which neither overflows (it goes
    to -0 for l -> -inf) nor loses 1 - exp(-l) for small l."""
    small = logits.abs() < CB_MEAN_SERIES_BELOW
    l2 = logits.square()
    series = 0.5 + logits * (1 / 12 + l2 * (-1 / 720 + l2 * (1 / 30240)))
    safe = torch.where(small, torch.ones_like(logits), logits)  # no 0/0 in the branch not taken
    closed = -1 / torch.expm1(-safe) - 1 / safe
    return torch.where(small, series, closed)


class MLPVAE(VAE):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        pixels = math.prod(config.image_shape)
        widths = [pixels, *config.hidden_dims]
        self.encoder = nn.Sequential(nn.Flatten(), *_mlp(widths + [2 * config.latent_dim]))
        self.decoder = nn.Sequential(*_mlp([config.latent_dim, *reversed(widths)]), nn.Unflatten(1, config.image_shape))


class ConvVAE(VAE):
    """Stride-2 convolutions down to (H, W) / 2**n, dense layers to the latent, and the mirror image up."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        channels, height, width = config.image_shape
        factor = 2 ** len(config.conv_channels)
        inner_shape = (config.conv_channels[-1], height // factor, width // factor)
        inner = math.prod(inner_shape)
        down = [channels, *config.conv_channels]
        conv: list[nn.Module] = []
        for fan_in, fan_out in zip(down[:-1], down[1:]):
            conv += [nn.Conv2d(fan_in, fan_out, config.conv_kernel, stride=2, padding=1), nn.ReLU()]
        dense = [inner, *config.hidden_dims]
        self.encoder = nn.Sequential(*conv, nn.Flatten(), *_mlp(dense + [2 * config.latent_dim]))
        up = list(reversed(down))
        deconv: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(up[:-1], up[1:])):
            deconv.append(nn.ConvTranspose2d(fan_in, fan_out, config.conv_kernel, stride=2, padding=1))
            if i < len(up) - 2:
                deconv.append(nn.ReLU())
        self.decoder = nn.Sequential(
            *_mlp([config.latent_dim, *reversed(dense)]), nn.ReLU(), nn.Unflatten(1, inner_shape), *deconv
        )


def build_model(config: VAEConfig) -> VAE:
    return {"mlp": MLPVAE, "conv": ConvVAE}[config.arch](config)


def parse_widths(text: str, name: str) -> tuple[int, ...]:
    """'512,256' -> (512, 256); raises ValueError naming `name` (the caller's name for the text) on bad input."""
    try:
        widths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{name} takes comma-separated integers like 512,256; got {text!r}") from None
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"{name} needs at least one positive width; got {text!r}")
    return widths
