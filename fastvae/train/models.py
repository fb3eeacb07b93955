"""VAEs for small images, built from one config dataclass.

Both models map images `[B, C, H, W]` in [0, 1] to a diagonal Gaussian q(z|x)
(`mu, logvar` `[B, L]`) and latents `[B, L]` back to Bernoulli logits
`[B, C, H, W]`. The image shape comes from the dataset, never from a constant.
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

    def __post_init__(self) -> None:
        # JSON round trips give lists; the config must stay hashable and comparable.
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
        self.validate()

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
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
                raise ValueError(f"the conv VAE halves H and W {len(self.conv_channels)} times, so they must "
                                 f"be divisible by {factor}; images are {height}x{width}: pass fewer conv channels")

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
    """Shared encode/forward logic; subclasses build `encoder` and `decoder`."""

    config: VAEConfig
    encoder: nn.Module  # [B, C, H, W] -> [B, 2L]
    decoder: nn.Module  # [B, L] -> [B, C, H, W] logits

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, H, W] -> mu, logvar [B, L] (row views of one [B, 2L] output, no copy)."""
        return self.encoder(x).chunk(2, dim=1)

    def decode(self, z: Tensor) -> Tensor:
        """z [B, L] -> Bernoulli logits [B, C, H, W]."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, C, H, W] -> logits [B, C, H, W], mu, logvar [B, L], kl [B] (float32).

        z ~ q(z|x) and its KL to N(0, I) come from one fused fastvae op."""
        mu, logvar = self.encode(x)
        z, kl = fastvae.reparameterize_kl(mu, logvar)
        return self.decode(z), mu, logvar, kl

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws from the prior decoded to pixel probabilities [n, C, H, W]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.config.latent_dim, generator=generator).to(device)
        return torch.sigmoid(self.decode(z).float())


class MLPVAE(VAE):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        pixels = math.prod(config.image_shape)
        widths = [pixels, *config.hidden_dims]
        self.encoder = nn.Sequential(nn.Flatten(), *_mlp(widths + [2 * config.latent_dim]))
        self.decoder = nn.Sequential(*_mlp([config.latent_dim, *reversed(widths)]),
                                     nn.Unflatten(1, config.image_shape))


class ConvVAE(VAE):
    """Stride-2 convolutions down to (H, W) / 2**n, dense layers to the latent, and the mirror image up."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
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
        self.decoder = nn.Sequential(*_mlp([config.latent_dim, *reversed(dense)]), nn.ReLU(),
                                     nn.Unflatten(1, inner_shape), *deconv)


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

