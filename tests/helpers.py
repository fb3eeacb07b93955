"""Shared test tables and the float64 oracle the backends are checked against."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_params() -> list:
    """Every backend, skipped (with the reason) where it cannot run on DEVICE."""
    from fastvae.backend import unavailable_reason

    params = []
    for name in fastvae.backend.BACKENDS:
        reason = unavailable_reason(name, DEVICE)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


BACKENDS = backend_params()

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Tolerance by the dtype of the tensor being checked: losses are float32 whatever
# the inputs, z and gradients carry their input's dtype (one rounding of the output).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_close_to(actual: Tensor, expected: Tensor, name: str) -> None:
    """actual vs the float64 oracle, relative to the oracle's scale: |a - e| <= tol * (|e| + max|e|/10).

    Plus a few subnormal steps of actual's dtype: a "mean" over thousands of
    elements gives fp16 gradients below its smallest normal number."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    tol = TOLERANCE[actual.dtype]
    expected = expected.detach().double()
    err = (actual.detach().double() - expected).abs()
    scale = expected.abs() + expected.abs().max().clamp_min(1e-30) / 10
    finfo = torch.finfo(actual.dtype)
    err = (err - 4 * finfo.smallest_normal * finfo.eps).clamp_min(0.0)
    worst = (err / scale).max().item() if err.numel() else 0.0
    assert worst <= tol, f"{name}: relative error {worst:.3g} > {tol:.3g} ({actual.dtype})"


# ---------------------------------------------------------------- float64 oracle (autograd-able)
def oracle_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    mu, logvar = mu.double(), logvar.double()
    return 0.5 * (mu * mu + torch.exp(logvar) - logvar - 1.0)


def oracle_logp(logits: Tensor, target: Tensor) -> Tensor:
    l, x = logits.double(), target.double()
    return -(l.clamp_min(0.0) - l * x + torch.log1p(torch.exp(-l.abs())))


def oracle_z(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    return mu.double() + torch.exp(0.5 * logvar.double()) * eps.double()


def rows_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


def leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


class RecordPointwiseSizes(TorchDispatchMode):
    """Records the numel of every pointwise aten op's output run under it in `sizes`: a
    backward that hands a saved gradient over must show no op the size of [B, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.Tag.pointwise in func.tags:
            self.sizes.append(out.numel())
        return out
