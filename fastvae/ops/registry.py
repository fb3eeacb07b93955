"""The one table of fused op families, and dispatch from it.

A family is a folder `fastvae/ops/<name>/` holding everything about one piece of math:

    reference.py   the math in plain PyTorch: the `torch` backend and the definition
    triton.py      Triton kernels and their launchers: the `triton` backend
    native.py      the ctypes binding of kernels/<name>.cpp: the `native` backend
    op.py          the custom ops (schema, fake implementation, autograd)
    spec.py        what tests and benchmarks need: inputs, float64 oracle, competitors

Each backend module implements the family's `kernels`, the functions the ops call, with
the reference's signatures. Dispatch (`implementation`), the backend conformance test,
the op tests and the benchmarks all read FAMILIES, so a backend that lacks a kernel
fails a test rather than a user. docs/adding-an-op.md walks through adding a family.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from fastvae.backend import BACKENDS, resolve_backend_name

# The module of each backend inside a family's folder.
BACKEND_MODULES = {"torch": "reference", "triton": "triton", "native": "native"}


@dataclass(frozen=True)
class Family:
    """An op family: its folder name and the kernel functions each backend implements."""

    name: str
    kernels: tuple[str, ...]

    def module(self, backend: str) -> ModuleType:
        """The module of `backend` (triton, native or torch) in this family's folder."""
        return _module(self.name, BACKEND_MODULES[backend])

    def spec(self) -> ModuleType:
        """The family's spec module (tests and benchmarks)."""
        return _module(self.name, "spec")


FAMILIES: tuple[Family, ...] = (
    Family("gaussian", ("reparameterize_kl_forward", "reparameterize_kl_backward", "gaussian_kl_forward")),
    Family("bernoulli", ("bernoulli_forward",)),
    Family("continuous_bernoulli", ("continuous_bernoulli_forward",)),
    Family("gaussian_likelihood", ("gaussian_likelihood_forward",)),
    # The likelihood families' kernels score its K samples (row-periodic targets); its own
    # kernels are the [K, B, L] latent terms with the weights, and their backward.
    Family("iwae", ("iwae_forward", "iwae_backward")),
)


@functools.cache
def _module(family: str, module: str) -> ModuleType:
    return importlib.import_module(f"fastvae.ops.{family}.{module}")


@functools.cache
def family(name: str) -> Family:
    for candidate in FAMILIES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no op family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def implementation(family_name: str, kernel: str, device: torch.device) -> Callable:
    """The `kernel` function of the backend that runs ops on `device` now (see fastvae.backend)."""
    backend = resolve_backend_name(device)
    found = _KERNELS.get((family_name, kernel, backend))
    if found is None:
        found = _KERNELS[family_name, kernel, backend] = getattr(family(family_name).module(backend), kernel)
    return found


# (family, kernel, backend) -> the function: one dict lookup per op call once it is known.
_KERNELS: dict[tuple[str, str, str], Callable] = {}


def op_specs() -> list:
    """Every public op's test and benchmark spec (`OpSpec`), family by family."""
    return [spec for fam in FAMILIES for spec in fam.spec().OPS]


__all__ = ["BACKENDS", "BACKEND_MODULES", "FAMILIES", "Family", "family", "implementation", "op_specs"]
