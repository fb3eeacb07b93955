"""The continuous Bernoulli log-likelihood in plain PyTorch: the `torch` backend, and what the kernels compute.

The continuous Bernoulli (Loaiza-Ganem & Cunningham, NeurIPS 2019) is a density on [0, 1]:

    log p(x | l) = x*l - softplus(l) + log C(l),   C(l) = l / tanh(l/2)   (C(0) = 2)

for logits l and targets x in [0, 1]. Neither naive form survives floating point: l / tanh(l/2)
is 0/0 at l = 0, and its derivative 1/l - 1/sinh(l) cancels to noise near 0. With a = |l| and
e = exp(-a), softplus(l) = max(l, 0) + log1p(e) and C(l) = a (1 + e) / (1 - e), so the log1p(e)
terms cancel exactly and

    log p = x*l - max(l, 0) + log(a / (1 - e))     for a >= 1: no exponent overflows, 1 - e >= 0.63
          = (x - 1/2)*l + h(l)                       for a < 1, with the even series
    h(l) = -log(sinh(l/2) / (l/2)) = sum_k c_k l^(2k),   c_k = -B_2k / (2k (2k)!)   (Bernoulli numbers)
         = -l^2/24 + l^4/2880 - l^6/181440 + ...

(max(l, 0) = (l + a)/2 turns one form into the other). The derivative, from the same pieces:

    dlogp/dl = x - [l > 0] + sign(l) * ((1 - e) - a*e) / (a (1 - e))     for a >= 1
             = x - 1/2 + h'(l),   h'(l) = sum_k 2k c_k l^(2k-1) = -l/12 + l^3/720 - ...   for a < 1

both equal to x - sigmoid(l) + 1/l - 1/sinh(l); dlogp/dx = l (log C does not depend on x).
At a < 1 the series' terms shrink by about (a / 2 pi)^2 each: the eleven kept here leave a
relative error below 1e-18, enough for float64. A target outside [0, 1] makes its element NaN
(value and gradient): the density is zero there, and a NaN cannot go unnoticed the way a
plausible number can.

Every tensor argument is a row view (unit stride along D; rows may be strided): logits [B, D]
and a target [T, D] whose row count T divides B, row b of the logits scored against target
row b % T (T = B is the plain case; T < B lets an importance-weighted bound score K samples'
logits [K * B, D] against the data [B, D] without a copy). Math runs in float64 for float64
inputs, else float32; log p comes back in the compute dtype, the gradient in the logits' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.ops.common import loss_dtype, tile_rows

# Below this |l|, the series; at and above it, the closed forms (whose cancellations are mild there).
SERIES_BELOW = 1.0
# c_k of h(l) = sum_k c_k l^(2k), k = 1..11, and 2k c_k of h'(l) / l.
H_SERIES = (
    -1 / 24,
    1 / 2880,
    -1 / 181440,
    1 / 9676800,
    -1 / 479001600,
    691 / 15692092416000,
    -1 / 1046139494400,
    3617 / 170729965486080000,
    -43867 / 91963695909076992000,
    174611 / 16057153253965824000000,
    -77683 / 310224200866619719680000,
)
H_PRIME_SERIES = tuple(2 * k * c for k, c in enumerate(H_SERIES, start=1))


def _polynomial(p: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """sum_k coefficients[k] * p^k by Horner's rule."""
    out = torch.full_like(p, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * p + c
    return out


def _branches(logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(small, l_series, a_closed, e): where the series applies, the logits with the closed forms'
    elements zeroed, |l| with the series' elements set to 1, and exp(-a_closed).

    Each branch sees only arguments it is finite at (l^22 overflows for large l, 0/0 at l = 0),
    so torch.where's gradient, which multiplies the unused branch by zero, stays finite."""
    a = logits.abs()
    small = a < SERIES_BELOW
    l_series = torch.where(small, logits, 0.0)
    a_closed = torch.where(small, SERIES_BELOW, a)
    return small, l_series, a_closed, torch.exp(-a_closed)


def log_prob(logits: Tensor, target: Tensor) -> Tensor:
    """log p(target | logits) per element (differentiable), NaN where target is outside [0, 1]."""
    small, l_series, a_closed, e = _branches(logits)
    p = l_series * l_series
    series = (target - 0.5) * logits + p * _polynomial(p, H_SERIES)
    closed = target * logits - torch.clamp_min(logits, 0.0) + torch.log(a_closed / (1.0 - e))
    logp = torch.where(small, series, closed)
    return torch.where((target >= 0) & (target <= 1), logp, torch.nan)


def grad_logits(logits: Tensor, target: Tensor) -> Tensor:
    """dlogp/dlogits per element, NaN where target is outside [0, 1]."""
    small, l_series, a_closed, e = _branches(logits)
    series = (target - 0.5) + l_series * _polynomial(l_series * l_series, H_PRIME_SERIES)
    closed = (
        target
        - (logits > 0).to(logits.dtype)
        + torch.sign(logits) * ((1.0 - e) - a_closed * e) / (a_closed * (1.0 - e))
    )
    grad = torch.where(small, series, closed)
    return torch.where((target >= 0) & (target <= 1), grad, torch.nan)


def continuous_bernoulli_forward(
    logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool, weight: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """logits [B, D], target [T, D] (T divides B) -> log p ([B, D] if elementwise else [B]),
    weight * dlogp/dlogits [B, D] (or None).

    The gradient is scaled before it is rounded to the logits' dtype."""
    compute = loss_dtype(logits, target)
    l, x = logits.to(compute), tile_rows(target, logits.shape[0]).to(compute)
    logp = log_prob(l, x)
    logp = logp if elementwise else logp.sum(dim=1)
    if not compute_grad:
        return logp, None
    return logp, (weight * grad_logits(l, x)).to(logits.dtype)
