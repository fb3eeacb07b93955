"""The one place that defines what the benchmarks run: op x provider x mode x size x precision.

The ops are the registry's (`fastvae.ops.registry.op_specs`, those with benchmark=True). A
case is one op at one size (batch, and the data / latent width the op uses), one precision,
one provider and one mode. The default grids are the headline settings, a few minutes on 2
CPU cores; `--sweep` adds every size, precision and mode, and `--gpu-run` the sweep sized
for the prepared GPU run (benchmarks/gpu/run.sh).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

MODES = ("forward", "backward", "full")

# Sizes. 784 is a flattened 28x28 image; 12288 a 3x64x64 RGB image. K = 5 and 50 samples per
# datapoint are the importance-weighted bound's settings in Burda et al. (ICLR 2016).
MNIST_PIXELS = 28 * 28
RGB64_PIXELS = 3 * 64 * 64
IWAE_SAMPLES = (5, 50)


@dataclass(frozen=True)
class Precision:
    """How the op's tensors are stored and whether the call runs under autocast.

    `param` is the dtype of what a network produces (logits, mu, logvar); `target` the dtype
    of the data. The AMP setting mirrors a training step under torch.autocast: the linear
    layers hand the loss low-precision activations while the data from the loader stays
    float32, and the loss is called inside autocast."""

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
    """Who computes the op: the eager PyTorch a user writes, torch.compile of that same code, or
    fastvae on one named backend."""

    name: str
    kind: str  # "eager" | "compiled" | "fastvae"
    backend: str | None = None


EAGER = Provider("eager", "eager")
COMPILED = Provider("compiled", "compiled")
PROVIDERS = ("eager", "compiled", "fastvae-triton", "fastvae-native", "fastvae-torch")  # the report's order


def providers_for(device: torch.device, sweep: bool = False) -> tuple[Provider, ...]:
    """Competitors first, then fastvae: triton on CUDA; native on CPU, and in the sweep also the
    torch reference (slow by design: it is the definition). Triton on CPU only runs in the
    interpreter, far too slow to time."""
    backends = ("triton",) if device.type == "cuda" else ("native", "torch") if sweep else ("native",)
    return (EAGER, COMPILED) + tuple(Provider(f"fastvae-{b}", "fastvae", b) for b in backends)


@dataclass(frozen=True)
class Grid:
    """A product of sizes, precisions and modes; an op takes only the size axes it uses.

    `samples` (K of an importance-weighted op) makes a grid of its own: a grid with samples
    sizes runs only the ops with a samples axis, and those run only on such grids."""

    batch: tuple[int, ...]
    data: tuple[int, ...]
    latent: tuple[int, ...]
    precisions: tuple[str, ...]
    modes: tuple[str, ...] = ("full",)
    samples: tuple[int, ...] = ()
    ops: tuple[str, ...] = ()  # only these ops; empty: every op


# The headline: forward + backward at a training batch and at throughput batches, and the
# low precisions at one batch. This is what the README's table quotes. Then the IWAE
# setting: a training batch with IWAE_SAMPLES samples per datapoint.
DEFAULT_GRIDS = (
    Grid((128, 1024, 4096), (MNIST_PIXELS,), (32,), ("fp32",)),
    Grid((4096,), (MNIST_PIXELS,), (32,), ("bf16", "amp")),
    Grid((128,), (MNIST_PIXELS,), (32,), ("fp32",), samples=IWAE_SAMPLES),
)
SWEEP_GRIDS = (
    Grid((64, 256, 1024, 4096, 16384), (MNIST_PIXELS,), (32,), ("fp32",), MODES),
    Grid((4096,), (MNIST_PIXELS, RGB64_PIXELS), (32, 64, 128), ("fp32", "bf16", "fp16", "amp"), MODES),
    Grid((32, 128, 512), (MNIST_PIXELS,), (32,), ("fp32", "bf16", "amp"), MODES, samples=(1,) + IWAE_SAMPLES),
)
# The prepared GPU run, in the two minutes it gives the sweep (a case took 2.4 s on an H200,
# mostly the compiled provider's compile): the ops with GPU targets (benchmarks/report.py's
# TARGETS) first, at the smallest and largest batch the targets cover, every other op once at
# the largest, and the importance-weighted ops at one training batch.
GPU_TARGET_OPS = ("elbo_loss", "vae_loss")
GPU_RUN_GRIDS = (
    Grid((4096, 65536), (MNIST_PIXELS,), (32,), ("fp32", "bf16"), ops=GPU_TARGET_OPS),
    Grid((65536,), (MNIST_PIXELS,), (32,), ("fp32",)),
    Grid((1024,), (MNIST_PIXELS,), (32,), ("fp32",), samples=IWAE_SAMPLES),
)

# The setting the report plots and the README quotes: the first default grid.
HEADLINE = {"data": MNIST_PIXELS, "latent": 32, "precision": "fp32"}


@dataclass(frozen=True)
class Case:
    """One benchmark: `data` / `latent` / `samples` are None for an op that has no such axis."""

    op: str
    mode: str
    provider: Provider
    precision: Precision
    batch: int
    data: int | None
    latent: int | None
    samples: int | None = None

    @property
    def sizes(self) -> dict[str, int | None]:
        return {"batch": self.batch, "data": self.data, "latent": self.latent, "samples": self.samples}

    @property
    def id(self) -> str:
        sizes = [f"B{self.batch}"] if self.samples is None else [f"K{self.samples}", f"B{self.batch}"]
        if self.data is not None:
            sizes.append(f"D{self.data}")
        if self.latent is not None:
            sizes.append(f"L{self.latent}")
        return "-".join([self.op, self.mode, self.provider.name, self.precision.name] + sizes)


def grids(selection: str) -> tuple[Grid, ...]:
    """The grids of a selection: "default", "sweep" (default + sweep) or "gpu-run"."""
    return {"default": DEFAULT_GRIDS, "sweep": DEFAULT_GRIDS + SWEEP_GRIDS, "gpu-run": GPU_RUN_GRIDS}[selection]


def cases(op: str, op_axes: tuple[str, ...], device: torch.device, selection: str = "default") -> list[Case]:
    """Every case of `op` (whose size axes are `op_axes`, e.g. ("batch", "data")) on `device`.
    Ordered by shape, then provider, then mode, so a compiled shape is reused from the cache."""
    precisions = precisions_for(device)
    shapes = []
    for grid in grids(selection):
        if bool(grid.samples) != ("samples" in op_axes):
            continue  # a samples grid is for the ops with a samples axis only, and they for it only
        if grid.ops and op not in grid.ops:
            continue
        data = grid.data if "data" in op_axes else (None,)
        latent = grid.latent if "latent" in op_axes else (None,)
        samples = grid.samples or (None,)
        names = [p for p in grid.precisions if p in precisions]
        for name, k, batch, d, lat in itertools.product(names, samples, grid.batch, data, latent):
            for mode in grid.modes:
                shapes.append((precisions[name], batch, d, lat, k, mode))
    out = []
    for precision, batch, d, lat, k, mode in dict.fromkeys(shapes):
        for provider in providers_for(device, sweep=selection == "sweep"):
            out.append(Case(op, mode, provider, precision, batch, d, lat, k))
    return list(dict.fromkeys(out))
