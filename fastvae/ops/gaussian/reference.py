"""The Gaussian posterior in plain PyTorch: the `torch` backend, and what the kernels compute.

    z    = mu + exp(0.5 * logvar) * eps,  eps the Philox stream of fastvae.ops.noise
    kl   = 0.5 * (mu^2 + exp(logvar) - logvar - 1)
         = 0.5 * (mu^2 + expm1_minus_x(logvar))         (no digits lost near logvar = 0)
    dz/dmu = 1,  dz/dlogvar = 0.5 * exp(0.5 * logvar) * eps,  dz/deps = exp(0.5 * logvar)
    dkl/dmu = mu,  dkl/dlogvar = 0.5 * expm1(logvar)

Every tensor argument is a row view [B, L] (unit stride along L; rows may be strided).
Math runs in float64 for float64 inputs, else float32; z and gradients come back in
their input's dtype, KL rows in the compute dtype. `seed` is a 0-d int64 tensor on the
inputs' device, ignored when eps is given.

K `samples` per row (importance-weighted bounds): z, eps and grad_z have K * B rows, sample
k of row b at row k * B + b, which reads mu and logvar row b (a row period of B: the
posterior is never copied K times). The noise of that row is the Philox stream at flat
index (k * B + b) * L + j, so K samples are K copies of the rows through the one-sample
kernel. The KL does not depend on the sample: it stays [B]. Backward sums the K samples'
grad_z inside the kernel, in the compute dtype:
    grad_mu[b]     = sum_k grad_z[k, b] + grad_kl[b] * mu[b]
    grad_logvar[b] = 0.5 * exp(0.5 * logvar[b]) * sum_k grad_z[k, b] * eps[k, b]
                     + grad_kl[b] * 0.5 * expm1(logvar[b])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastvae.ops.common import loss_dtype
from fastvae.ops.noise import philox_normal


def expm1_minus_x(x: Tensor) -> Tensor:
    """exp(x) - 1 - x, about x^2 / 2 near 0, where expm1(x) - x would cancel (0.2% off at x = 1e-4
    in float32): there its Taylor series x^2 (1/2 + x/6 + ... + x^16/18!), else expm1(x) - x."""
    series = torch.zeros_like(x)
    for k in range(18, 1, -1):
        series = series * x + 1.0 / math.factorial(k)
    return torch.where(x.abs() < 0.5, x * x * series, torch.expm1(x) - x)


def kl_elements(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element, in mu's dtype (callers upcast)."""
    return 0.5 * (mu * mu + expm1_minus_x(logvar))


def noise(mu: Tensor, eps: Tensor | None, seed: Tensor, compute: torch.dtype, samples: int = 1) -> Tensor:
    """eps [K, B, L] in the compute dtype: the caller's (eps [K * B, L]), or the Philox stream
    drawn for K * B rows of mu's width."""
    shape = (samples,) + tuple(mu.shape)
    if eps is not None:
        return eps.to(compute).reshape(shape)
    return philox_normal(seed, shape, compute, mu.device)


def reparameterize_kl_forward(
    mu: Tensor, logvar: Tensor, eps: Tensor | None, seed: Tensor, samples: int = 1
) -> tuple[Tensor, Tensor]:
    """mu, logvar [B, L], eps [K * B, L] -> z [K * B, L] (mu's dtype), kl [B]."""
    compute = loss_dtype(mu, logvar)
    m, lv = mu.to(compute), logvar.to(compute)
    z = m + torch.exp(0.5 * lv) * noise(mu, eps, seed, compute, samples)  # [K, B, L], mu broadcast
    return z.reshape(-1, mu.shape[1]).to(mu.dtype), kl_elements(m, lv).sum(dim=1)


def reparameterize_kl_backward(
    grad_z: Tensor | None,
    grad_kl: Tensor | None,
    mu: Tensor,
    logvar: Tensor,
    eps: Tensor | None,
    seed: Tensor,
    samples: int = 1,
) -> tuple[Tensor, Tensor]:
    """grad_z [K * B, L] | None, grad_kl [B] | None -> grad_mu, grad_logvar [B, L] (mu's, logvar's dtype)."""
    compute = loss_dtype(mu, logvar)
    m, lv = mu.to(compute), logvar.to(compute)
    grad_mu = torch.zeros_like(m)
    grad_logvar = torch.zeros_like(lv)
    if grad_z is not None:
        g = grad_z.to(compute).reshape((samples,) + tuple(mu.shape))
        grad_mu = grad_mu + g.sum(dim=0)
        eps_sum = (g * noise(mu, eps, seed, compute, samples)).sum(dim=0)
        grad_logvar = grad_logvar + 0.5 * torch.exp(0.5 * lv) * eps_sum
    if grad_kl is not None:
        g = grad_kl.to(compute)[:, None]
        grad_mu = grad_mu + g * m
        grad_logvar = grad_logvar + g * 0.5 * torch.expm1(lv)
    return grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype)


def gaussian_kl_forward(
    mu: Tensor, logvar: Tensor, elementwise: bool, compute_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """mu, logvar [B, L] -> kl ([B, L] if elementwise else [B]), dkl/dmu, dkl/dlogvar (or None)."""
    compute = loss_dtype(mu, logvar)
    m, lv = mu.to(compute), logvar.to(compute)
    kl = kl_elements(m, lv)
    kl = kl if elementwise else kl.sum(dim=1)
    if not compute_grad:
        return kl, None, None
    return kl, mu.clone(), (0.5 * torch.expm1(lv)).to(logvar.dtype)
