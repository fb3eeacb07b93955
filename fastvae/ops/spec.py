"""How tests and benchmarks see a public op: its inputs, outputs, a float64 oracle and the plain
PyTorch a user would write instead. Each family's spec.py lists its ops as `OPS`.

The oracle is written independently of the backends (textbook formulas in float64, or
torch.distributions where it is exact), so that the backends are checked against something
other than themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Arg:
    """A tensor an op takes or returns.

    dims: size axes by name ("batch", "samples", "data", "latent"); a shape table gives each
        axis its sizes ("data" may be several dims, e.g. (1, 28, 28)).
    kind: "param" (a network output: the precision's dtype, differentiable), "target" (data:
        the target dtype) or "loss" (float32 whatever the inputs).
    values: "normal" (times scale), "binary" ({0, 1}) or "unit" (grey levels in [0, 1])."""

    name: str
    dims: tuple[str, ...]
    kind: str = "param"
    values: str = "normal"
    scale: float = 1.0

    @property
    def differentiable(self) -> bool:
        return self.kind == "param"

    def shape(self, sizes: dict[str, int | tuple[int, ...]]) -> tuple[int, ...]:
        out: list[int] = []
        for dim in self.dims:
            size = sizes[dim]
            out.extend(size if isinstance(size, tuple) else (size,))
        return tuple(out)

    def make(
        self, sizes: dict, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """Fresh random values of this argument (never zeros), in `dtype` on `device`."""
        shape = self.shape(sizes)
        if self.values == "binary":
            value = (torch.rand(shape, generator=generator) < 0.5).double()
        elif self.values == "unit":
            value = torch.rand(shape, generator=generator, dtype=torch.float64)
            value.view(-1)[::2] = value.view(-1)[::2].round()  # binary pixels beside grey levels
        else:
            value = torch.randn(shape, generator=generator, dtype=torch.float64) * self.scale
        return value.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class OpSpec:
    """A public op as tests and benchmarks call it.

    fastvae(*inputs, **kw) calls the public API; oracle(*inputs, **kw) computes the same
    outputs in float64 from independent formulas; eager(*inputs, **kw) is the plain PyTorch
    a user writes instead (the benchmarks' competitor; None where there is none). Each of
    `reductions` is passed as reduction=...; an op that draws noise gets generator= (fastvae)
    and eps= (oracle: the noise the generator's seed gives, of the size axes `noise_dims`).
    Each of `size_kwargs` (size axes no input has, e.g. "samples" of a sampler) is passed to
    all three by name, as an int. `min_tolerance` is a floor under the oracle tests' relative
    tolerance, for an op whose math amplifies float32 rounding (0: the dtype's own)."""

    name: str
    inputs: tuple[Arg, ...]
    outputs: tuple[Arg, ...]
    fastvae: Callable
    oracle: Callable
    eager: Callable | None = None
    reductions: tuple[str, ...] = ()
    noise_dims: tuple[str, ...] | None = None
    size_kwargs: tuple[str, ...] = ()
    min_tolerance: float = 0.0
    benchmark: bool = True
    extra: dict = field(default_factory=dict)

    def noise_shape(self, sizes: dict) -> tuple[int, ...]:
        """The shape of the noise the op draws at `sizes` (what its oracle gets as eps)."""
        return Arg("eps", self.noise_dims).shape(sizes)

    def size_arguments(self, sizes: dict) -> dict[str, int]:
        """The keyword arguments `size_kwargs` asks for at `sizes`."""
        return {name: sizes[name] for name in self.size_kwargs}

    @property
    def axes(self) -> tuple[str, ...]:
        """The size axes the op uses (its inputs', then size_kwargs), in order of first appearance."""
        return tuple(dict.fromkeys([d for arg in self.inputs for d in arg.dims] + list(self.size_kwargs)))

    def min_bytes(self, sizes: dict, param: torch.dtype, target: torch.dtype, mode: str) -> int:
        """Bytes the op must move at least: forward reads the inputs and writes the outputs;
        backward reads the inputs and upstream gradients and writes the input gradients; full
        touches each once (a fused kernel keeps the forward's values in registers)."""

        def nbytes(arg: Arg) -> int:
            dtype = {"param": param, "target": target, "loss": torch.float32}[arg.kind]
            return math.prod(arg.shape(sizes)) * dtype.itemsize

        grads = [a for a in self.inputs if a.differentiable]
        touched = {
            "forward": [*self.inputs, *self.outputs],
            "backward": [*self.inputs, *self.outputs, *grads],
            "full": [*self.inputs, *self.outputs, *self.outputs, *grads],
        }[mode]
        return sum(nbytes(a) for a in touched)
