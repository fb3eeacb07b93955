"""The Gaussian posterior's public ops as tests and benchmarks see them (fastvae.ops.spec)."""

from __future__ import annotations

import torch

import fastvae
from fastvae.ops.spec import Arg, OpSpec

MU = Arg("mu", ("batch", "latent"))
LOGVAR = Arg("logvar", ("batch", "latent"), scale=1.5)


def oracle_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element, the textbook formula."""
    return 0.5 * (mu * mu + torch.exp(logvar) - logvar - 1.0)


def oracle_reparameterize_kl(mu, logvar, eps, samples=None):
    """z (eps [B, ...], or [K, B, ...] with mu and logvar broadcast over the samples) and the KL [B]."""
    return mu + torch.exp(0.5 * logvar) * eps, oracle_kl(mu, logvar).flatten(1).sum(1)


def eager_reparameterize_kl(mu, logvar):
    """The two lines a user writes: noise from randn_like, the KL summed over the latent."""
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    return z, kl


def eager_reparameterize_kl_samples(mu, logvar, samples):
    """K samples per datapoint as a user writes them: noise for [K, B, L], mu broadcast."""
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn((samples,) + mu.shape, dtype=mu.dtype, device=mu.device)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    return z, kl


def reduce(elements, reduction):
    """The four reductions of a per-element loss, as their docstrings define them."""
    if reduction == "none":
        return elements
    if reduction == "sum":
        return elements.sum()
    if reduction == "mean":
        return elements.sum() / max(elements.numel(), 1)
    return elements.sum() / max(elements.shape[0], 1)


def eager_gaussian_kl(mu, logvar, reduction="batchmean"):
    return reduce(0.5 * (mu.pow(2) + logvar.exp() - logvar - 1), reduction)


OPS = (
    OpSpec(
        name="reparameterize_kl",
        inputs=(MU, LOGVAR),
        outputs=(Arg("z", ("batch", "latent")), Arg("kl", ("batch",), kind="loss")),
        fastvae=lambda mu, logvar, generator=None: fastvae.reparameterize_kl(mu, logvar, generator=generator),
        oracle=oracle_reparameterize_kl,
        eager=eager_reparameterize_kl,
        noise_dims=MU.dims,
    ),
    OpSpec(
        name="reparameterize_kl_samples",
        inputs=(MU, LOGVAR),
        outputs=(Arg("z", ("samples", "batch", "latent")), Arg("kl", ("batch",), kind="loss")),
        fastvae=lambda mu, logvar, samples, generator=None: fastvae.reparameterize_kl(
            mu, logvar, samples=samples, generator=generator
        ),
        oracle=oracle_reparameterize_kl,
        eager=eager_reparameterize_kl_samples,
        noise_dims=("samples",) + MU.dims,
        size_kwargs=("samples",),
    ),
    OpSpec(
        name="reparameterize_kl_given_eps",
        inputs=(MU, LOGVAR, Arg("eps", ("batch", "latent"))),
        outputs=(Arg("z", ("batch", "latent")), Arg("kl", ("batch",), kind="loss")),
        fastvae=fastvae.reparameterize_kl,
        oracle=oracle_reparameterize_kl,
        benchmark=False,
    ),
    OpSpec(
        name="gaussian_kl",
        inputs=(MU, LOGVAR),
        outputs=(Arg("kl", (), kind="loss"),),
        fastvae=fastvae.gaussian_kl,
        oracle=lambda mu, logvar, reduction="batchmean": reduce(oracle_kl(mu, logvar), reduction),
        eager=eager_gaussian_kl,
        reductions=("none", "sum", "mean", "batchmean"),
        benchmark=False,  # reparameterize_kl and elbo_loss time the same kernel inside the loss
    ),
)
