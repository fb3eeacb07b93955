"""The Bernoulli log-likelihood's public ops as tests and benchmarks see them (fastvae.ops.spec)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastvae
from fastvae.ops.gaussian.spec import LOGVAR, MU, oracle_kl, reduce
from fastvae.ops.spec import Arg, OpSpec

LOGITS = Arg("logits", ("batch", "data"), scale=3.0)
TARGET = Arg("target", ("batch", "data"), kind="target", values="unit")


def oracle_log_prob(logits, target):
    """log p(target | logits) per element, from torch.distributions (which accepts grey levels
    when its validation is off); NaN for a target outside [0, 1], as fastvae defines it."""
    target = target.to(logits.dtype)
    logp = torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(target)
    return torch.where((target >= 0) & (target <= 1), logp, torch.nan)


def oracle_elbo_rows(logits, target, mu, logvar, beta=1.0):
    """-log p(x|z) + beta * KL per datapoint [B]."""
    return -oracle_log_prob(logits, target).flatten(1).sum(1) + beta * oracle_kl(mu, logvar).flatten(1).sum(1)


def eager_bernoulli_log_likelihood(logits, target, reduction="batchmean"):
    return reduce(-F.binary_cross_entropy_with_logits(logits, target, reduction="none"), reduction)


def eager_elbo_loss(logits, target, mu, logvar, beta=1.0, reduction="batchmean"):
    """The loss as a user writes it: BCE with logits plus the closed-form KL."""
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).flatten(1).sum(1)
    rows = recon + beta * kl
    return rows if reduction == "none" else reduce(rows, "sum" if reduction == "sum" else "batchmean")


def fastvae_vae_loss(logits, target, mu, logvar, generator=None):
    """Sampling and the -ELBO, the whole loss side of a step: z and its KL from one kernel, the
    loss from the other (what the README's loop runs)."""
    z, kl = fastvae.reparameterize_kl(mu, logvar, generator=generator)
    return z, fastvae.elbo_loss(logits, target, kl=kl)


def oracle_vae_loss(logits, target, mu, logvar, eps):
    z = mu + torch.exp(0.5 * logvar) * eps
    return z, oracle_elbo_rows(logits, target, mu, logvar).mean()


def eager_vae_loss(logits, target, mu, logvar):
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    return z, eager_elbo_loss(logits, target, mu, logvar)


OPS = (
    OpSpec(
        name="bernoulli_log_likelihood",
        inputs=(LOGITS, TARGET),
        outputs=(Arg("logp", (), kind="loss"),),
        fastvae=fastvae.bernoulli_log_likelihood,
        oracle=lambda logits, target, reduction="batchmean": reduce(oracle_log_prob(logits, target), reduction),
        eager=eager_bernoulli_log_likelihood,
        reductions=("none", "sum", "mean", "batchmean"),
    ),
    OpSpec(
        name="elbo_loss",
        inputs=(LOGITS, TARGET, MU, LOGVAR),
        outputs=(Arg("loss", (), kind="loss"),),
        fastvae=lambda logits, target, mu, logvar, reduction="batchmean": fastvae.elbo_loss(
            logits, target, mu, logvar, beta=0.7, reduction=reduction
        ),
        oracle=lambda logits, target, mu, logvar, reduction="batchmean": reduce(
            oracle_elbo_rows(logits, target, mu, logvar, 0.7),
            "sum" if reduction == "sum" else "none" if reduction == "none" else "batchmean",
        ),
        eager=lambda logits, target, mu, logvar, reduction="batchmean": eager_elbo_loss(
            logits, target, mu, logvar, 0.7, reduction
        ),
        reductions=("none", "sum", "mean", "batchmean"),
    ),
    OpSpec(
        name="vae_loss",
        inputs=(LOGITS, TARGET, MU, LOGVAR),
        outputs=(Arg("z", ("batch", "latent")), Arg("loss", (), kind="loss")),
        fastvae=fastvae_vae_loss,
        oracle=oracle_vae_loss,
        eager=eager_vae_loss,
        noise_dims=MU.dims,
    ),
)
