"""The Gaussian log-likelihood in plain PyTorch: the `torch` backend, and what the kernels compute.

For a decoder's mean m and log-variance s (s = 0 when none is given: unit variance):

    log N(x; m, exp(s)) = -0.5 * ((x - m)^2 * exp(-s) + s + log 2pi)
                        = -0.5 * (r^2 + s + log 2pi),      r = (x - m) * exp(-s/2)
    dlogp/dm = (x - m) * exp(-s) = r * exp(-s/2),   dlogp/ds = 0.5 * (r^2 - 1),   dlogp/dx = -dlogp/dm

Going through r = (x - m) exp(-s/2) forms exp(-s/2), which stays finite down to s = -177
in float32 where exp(-s) overflows at s = -88, and (x - m)^2 exp(-s) never meets 0 * inf
for s in that range. Any finite x is valid; a NaN anywhere gives NaN.

Every tensor argument is a row view (unit stride along D; rows may be strided): mean [B, D],
a target [T, D] and a log-variance [R, D] (or None) whose row counts divide B: mean row b is
scored against target row b % T with log-variance row b % R. T = R = B is the plain case; a
single log-variance row is a parameter shared by all datapoints (a learned scalar or
per-feature log-variance, read without a [B, D] copy), and T < B lets an importance-weighted
bound score K samples' means [K * B, D] against the data [B, D] without a copy. Math runs in
float64 if any input is float64, else float32; log p comes back in the compute dtype, dlogp/dm
in the mean's dtype, dlogp/ds per element [B, D] in the dtype logvar_grad_dtype names.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastvae.ops.common import loss_dtype, tile_rows

LOG_2PI = math.log(2 * math.pi)


def log_prob(mean: Tensor, target: Tensor, logvar: Tensor | None) -> Tensor:
    """log N(target; mean, exp(logvar)) per element (differentiable); logvar None is unit variance,
    and it may be any shape that broadcasts to mean's."""
    if logvar is None:
        diff = target - mean
        return -0.5 * (diff * diff + LOG_2PI)
    r = (target - mean) * torch.exp(-0.5 * logvar)
    return -0.5 * (r * r + logvar + LOG_2PI)


def grads(mean: Tensor, target: Tensor, logvar: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(dlogp/dmean, dlogp/dlogvar) per element, both of the broadcast shape (None for no logvar)."""
    if logvar is None:
        return target - mean, None
    inv_std = torch.exp(-0.5 * logvar)
    r = (target - mean) * inv_std
    return r * inv_std, 0.5 * (r * r - 1.0)


def logvar_grad_dtype(mean: Tensor, target: Tensor, logvar: Tensor) -> torch.dtype:
    """The dtype dlogp/dlogvar [B, D] is written in: logvar's when it has a row per mean row, else
    the compute dtype. A shared log-variance's gradient is then summed over the rows, and
    per-element values rounded to float16 would lose what the sum needs."""
    return logvar.dtype if logvar.shape[0] == mean.shape[0] else loss_dtype(mean, target, logvar)


def gaussian_likelihood_forward(
    mean: Tensor, target: Tensor, logvar: Tensor | None, elementwise: bool, compute_grad: bool, weight: float = 1.0
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """mean [B, D], target [T, D], logvar [R, D] or None (T and R divide B) -> log p ([B, D] if
    elementwise else [B]), weight * dlogp/dmean [B, D] and weight * dlogp/dlogvar [B, D] (None
    without compute_grad, or without logvar).

    Gradients are scaled before they are rounded to their dtype."""
    rows = mean.shape[0]
    compute = loss_dtype(mean, target, logvar)
    m, x = mean.to(compute), tile_rows(target, rows).to(compute)
    s = None if logvar is None else tile_rows(logvar, rows).to(compute)
    logp = log_prob(m, x, s)
    logp = logp if elementwise else logp.sum(dim=1)
    if not compute_grad:
        return logp, None, None
    dmean, dlogvar = grads(m, x, s)
    if dlogvar is not None:
        dlogvar = (weight * dlogvar).to(logvar_grad_dtype(mean, target, logvar))
    return logp, (weight * dmean).to(mean.dtype), dlogvar
