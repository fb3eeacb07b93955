"""The one place that defines what the benchmarks run: setup x provider x mode x size.

A benchmark case is one op, at one size (batch, and the data / latent width the op
uses), at one precision, run by one provider, in one mode. The default grids keep a
CPU run to a few minutes on 2 cores; `GPU_SWEEP_GRIDS` adds the large sweep, selected
with ``--gpu-sweep`` (or ``-m gpu_sweep``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

MODES = ("forward", "backward", "full")

# Sizes. 784 is a flattened 28x28 MNIST image; 12288 a 3x64x64 RGB image.
BATCH_SIZES = (64, 256, 1024, 4096, 16384)
MNIST_PIXELS = 28 * 28
RGB64_PIXELS = 3 * 64 * 64
DATA_SIZES = (MNIST_PIXELS, RGB64_PIXELS)
LATENT_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Precision:
    """How the op's tensors are stored and whether the call runs under autocast.

    `param` is the dtype of what a network produces (logits, mu, logvar); `target`
    the dtype of the data. The AMP setting mirrors a training step under
    torch.autocast: the linear layers hand the loss low-precision activations while
    the data from the loader stays float32, and the loss is called inside autocast."""

    name: str
    param: torch.dtype
    target: torch.dtype
    autocast: torch.dtype | None = None


def precisions_for(device: torch.device) -> dict[str, Precision]:
    """The precisions that make sense on `device`: fp16 only on CUDA; AMP uses bf16 on CPU."""
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    table = [
        Precision("fp32", torch.float32, torch.float32),
        Precision("bf16", torch.bfloat16, torch.bfloat16),
        Precision("amp", low, torch.float32, autocast=low),
    ]
    if device.type == "cuda":
        table.append(Precision("fp16", torch.float16, torch.float16))
    return {p.name: p for p in table}


@dataclass(frozen=True)
class Provider:
    """Who computes the op: the eager reference as a user writes it, torch.compile of that
    same reference, or fastvae on one named backend."""

    name: str
    kind: str  # "eager" | "compiled" | "fastvae"
    backend: str | None = None


EAGER = Provider("eager", "eager")
COMPILED = Provider("compiled", "compiled")


def providers_for(device: torch.device) -> tuple[Provider, ...]:
    """Competitors first, then fastvae: its default (triton) on CUDA, each CPU backend by name on CPU.

    Triton on CPU only runs under TRITON_INTERPRET=1, which is far too slow to time."""
    backends = ("triton",) if device.type == "cuda" else ("native", "torch")
    return (EAGER, COMPILED) + tuple(Provider(f"fastvae-{b}", "fastvae", b) for b in backends)


@dataclass(frozen=True)
class Grid:
    """A product of sizes and precisions; an op takes only the size axes it uses."""

    batch: tuple[int, ...]
    data: tuple[int, ...]
    latent: tuple[int, ...]
    precisions: tuple[str, ...]


DEFAULT_GRIDS = (
    # Throughput against batch size at the MNIST setting: the headline curve.
    Grid(BATCH_SIZES, (MNIST_PIXELS,), (32,), ("fp32",)),
    # Every precision at one mid-size batch.
    Grid((4096,), (MNIST_PIXELS,), (32,), ("bf16", "fp16", "amp")),
    # A larger image and latent.
    Grid((1024,), (RGB64_PIXELS,), (128,), ("fp32",)),
    # The native CPU target's setting: batch 4096 x 784, latent 64, fp32.
    Grid((4096,), (MNIST_PIXELS,), (64,), ("fp32",)),
)
GPU_SWEEP_GRIDS = (
    Grid(BATCH_SIZES + (65536,), DATA_SIZES, LATENT_SIZES, ("fp32", "bf16", "fp16", "amp")),
)

# The setting the report plots and the README quotes: the first default grid.
HEADLINE = {"data": MNIST_PIXELS, "latent": 32, "precision": "fp32"}


@dataclass(frozen=True)
class Case:
    """One benchmark: `data` / `latent` are None for an op that has no such axis."""

    op: str
    mode: str
    provider: Provider
    precision: Precision
    batch: int
    data: int | None
    latent: int | None

    @property
    def id(self) -> str:
        sizes = [f"B{self.batch}"]
        if self.data is not None:
            sizes.append(f"D{self.data}")
        if self.latent is not None:
            sizes.append(f"L{self.latent}")
        return "-".join([self.mode, self.provider.name, self.precision.name] + sizes)


def _shapes(grid: Grid, axes: tuple[str, ...], precisions: dict[str, Precision]):
    """(precision, batch, data, latent) of `grid`, with the axes the op lacks set to None."""
    data = grid.data if "data" in axes else (None,)
    latent = grid.latent if "latent" in axes else (None,)
    names = [p for p in grid.precisions if p in precisions]
    for name, batch, d, l in itertools.product(names, grid.batch, data, latent):
        yield precisions[name], batch, d, l


def cases(op: str, axes: tuple[str, ...], device: torch.device) -> list[tuple[Case, bool]]:
    """Every case of `op` (whose size axes are `axes`, e.g. ("batch", "data")) on `device`,
    each with True when it belongs to the GPU sweep only. Ordered by shape, then
    provider, then mode, so a compiled shape is reused from the compile cache."""
    precisions = precisions_for(device)
    default = list(dict.fromkeys(s for g in DEFAULT_GRIDS for s in _shapes(g, axes, precisions)))
    sweep = [s for g in GPU_SWEEP_GRIDS for s in _shapes(g, axes, precisions) if s not in default]
    out = []
    for shape in default + list(dict.fromkeys(sweep)):
        for provider, mode in itertools.product(providers_for(device), MODES):
            out.append((Case(op, mode, provider, *shape), shape in sweep))
    return out
