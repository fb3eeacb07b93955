"""The importance-weighted bound's latent terms and weights in plain PyTorch: the `torch` backend, and
what the kernels compute. The likelihood term comes from the likelihood family's kernel.

With K samples of B datapoints, z [K * B, L] (sample k of row b at row k * B + b, reading mu
and logvar row b: a row period of B) and log p [K, B] from the likelihood:

    a_kb     = log N(z_kb; 0, I) - log N(z_kb; mu_b, exp(logvar_b))
             = 0.5 * sum_j [(z - mu)^2 exp(-logvar) + logvar - z^2]        (the log 2 pi cancel)
    log w_kb = log p_kb + a_kb
    loss_b   = log K - logsumexp_k log w_kb,    w~_kb = exp(log w_kb - logsumexp_k log w_kb)

Backward, from the upstream gradient g_b of loss_b and the saved weights, c_kb = -g_b w~_kb:

    IWAE:  grad_z_kb = c_kb ((z - mu) exp(-logvar) - z)
           grad_mu_b = -sum_k c_kb (z - mu) exp(-logvar)
           grad_logvar_b = 0.5 * (sum_k c_kb - sum_k c_kb (z - mu)^2 exp(-logvar))
    DReG:  grad_z_kb as IWAE's,  grad_mu = grad_logvar = 0   (fastvae.iwae_loss then weights z's
           whole gradient, the decoder's path included, by w~ once more: see fastvae.ops.iwae.op)

(The likelihood's gradient, c_kb dlogp/dlogits, is the op's: fastvae.ops.iwae.op.)

z, mu and logvar are row views (unit stride along L; rows may be strided); log p, the loss,
the weights and grad_rows are in the compute dtype (float64 for float64 inputs, else float32),
grad_rows with any element stride (0: one value broadcast, as the backward of a sum gives it).
Gradients come back in their input's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastvae.ops.common import loss_dtype


def _samples(
    logp_or_weights: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, compute: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """z as [K, B, L] and mu, logvar [B, L], all in the compute dtype."""
    samples, rows = logp_or_weights.shape
    return z.to(compute).reshape(samples, rows, -1), mu.to(compute), logvar.to(compute)


def iwae_forward(logp: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """log p [K, B], z [K * B, L], mu and logvar [B, L] -> the loss rows [B] and the normalized
    weights [K, B], in the compute dtype."""
    compute = loss_dtype(logp, z, mu, logvar)
    z3, m, lv = _samples(logp, z, mu, logvar, compute)
    diff = z3 - m
    log_w = logp.to(compute) + 0.5 * (diff * diff * torch.exp(-lv) + lv - z3 * z3).sum(dim=-1)
    lse = torch.logsumexp(log_w, dim=0)
    return math.log(log_w.shape[0]) - lse, torch.exp(log_w - lse)


def iwae_backward(
    grad_rows: Tensor, weights: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, dreg: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_rows [B], weights [K, B] -> grad_z [K * B, L], grad_mu and grad_logvar [B, L] (zero for
    DReG), in z's, mu's and logvar's dtypes."""
    compute = loss_dtype(weights, z, mu, logvar)
    z3, m, lv = _samples(weights, z, mu, logvar, compute)
    w = weights.to(compute)
    coef = -grad_rows.to(compute) * w
    scaled = (z3 - m) * torch.exp(-lv)  # (z - mu) / var
    grad_z = (coef[..., None] * (scaled - z3)).reshape(z.shape).to(z.dtype)
    if dreg:
        return grad_z, torch.zeros_like(mu), torch.zeros_like(logvar)
    weighted = coef[..., None] * scaled
    grad_mu = -weighted.sum(dim=0)
    grad_logvar = 0.5 * (coef.sum(dim=0)[:, None] - (weighted * (z3 - m)).sum(dim=0))
    return grad_z, grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype)
