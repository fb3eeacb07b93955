"""The Bernoulli log-likelihood in plain PyTorch: the `torch` backend, and what the kernels compute.

    log p(x | l) = x*l - softplus(l) = x*l - max(l, 0) - log1p(exp(-|l|))   (no exp overflows)
    dlogp/dl     = x - sigmoid(l),   dlogp/dx = l

for logits l and targets x in [0, 1] (binary, or grey levels). A target outside [0, 1]
makes its element NaN (value and gradient): x*l - softplus(l) is then no log-likelihood,
and a NaN cannot go unnoticed the way a plausible number can.

Every tensor argument is a row view [B, D] (unit stride along D; rows may be strided).
Math runs in float64 for float64 inputs, else float32; log p comes back in the compute
dtype, the gradient in the logits' dtype.

The target may have fewer rows than the logits, a count T that divides theirs: logits row r
is scored against target row r % T (row-periodic targets). K decoder samples per datapoint,
logits [K * B, D] against the data [B, D] (importance-weighted bounds), so read the data K
times without copying it K times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.ops.common import loss_dtype


def log1p_small(e: Tensor) -> Tensor:
    """log(1 + e) for 0 <= e <= 1 from log, accurate where 1 + e rounds (to 1, for tiny e), as the
    Triton kernels compute it. With u = 1 + e rounded, the rounding error r = e - (u - 1) is exact
    (u - 1 is, by Sterbenz), and log(1 + e) = log(u) + log(1 + r/u) = log(u) + r/u to within
    (r/u)^2 <= eps^2. torch.log1p would do, but its AVX-512 vector form runs several times slower
    than log on some CPUs, in eager torch and in inductor's generated code alike, and this is the
    composite compiled graphs inline (docs/design.md, "Compiled code on the CPU").

    Autograd sees log(u) alone, whose derivatives 1/u, -1/u^2, ... are log1p's to rounding: r is
    zero in exact arithmetic, so the correction enters detached. Differentiated, it would cost a
    compiled training step more than the rest of the likelihood's backward (docs/benchmarks.md)."""
    u = 1.0 + e
    return torch.log(u) + ((e - (u - 1.0)) / u).detach()


def log_prob(logits: Tensor, target: Tensor) -> Tensor:
    """log p(target | logits) per element (differentiable), NaN where target is outside [0, 1].

    Autograd must see softplus(l) = max(l, 0) + log1p(exp(-|l|)) as one smooth function, at
    l = 0 too, where both pieces have a kink. Both are written with the same side s = +1 for
    l >= 0, -1 below (a constant to autograd): |l| = s*l and max(l, 0) = l*(1 + s)/2. At l = 0
    autograd then takes both pieces' right-hand derivatives (1 and -1/2), which add up to the
    true 1/2 = sigmoid(0), and the second derivative to the true 1/4; clamp_min(l, 0) would give
    slope 1 with |l|'s sign(0) = 0, a gradient off by 1/2, which a decoder whose last layer
    starts at zero meets on its first step. Away from zero the slope of max(l, 0) is exactly 0
    or 1, so the tail's exp(-|l|) is not lost to rounding beside a 1/2 that (l + |l|) / 2 would
    add and cancel."""
    side = torch.where(logits >= 0, 1.0, -1.0)
    # x*l - max(l, 0) as one product: its slope x - [l >= 0] is formed before the tail's is added,
    # so a gradient x - sigmoid(l) near 0 (x = 1, l >> 0) is not lost to rounding either.
    logp = logits * (target - 0.5 * (1.0 + side)) - log1p_small(torch.exp(-(logits * side)))
    return torch.where((target >= 0) & (target <= 1), logp, torch.nan)


def bernoulli_forward(
    logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool, weight: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """logits [B, D], target [T, D] (T dividing B: row-periodic) -> log p ([B, D] if elementwise
    else [B]), weight * dlogp/dlogits (or None).

    The gradient is scaled before it is rounded to the logits' dtype."""
    compute = loss_dtype(logits, target)
    l, x = logits.to(compute), target.to(compute)
    if x.shape[0] != l.shape[0]:  # [P, T, D] logits against the [T, D] target, broadcast
        l = l.unflatten(0, (l.shape[0] // x.shape[0], x.shape[0]))
    logp = log_prob(l, x).flatten(0, -2)
    logp = logp if elementwise else logp.sum(dim=1)
    if not compute_grad:
        return logp, None
    valid = (x >= 0) & (x <= 1)
    grad = torch.where(valid, weight * (x - torch.sigmoid(l)), torch.nan)
    return logp, grad.flatten(0, -2).to(logits.dtype)
