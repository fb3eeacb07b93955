"""The continuous Bernoulli log-likelihood's public ops as tests and benchmarks see them (fastvae.ops.spec)."""

from __future__ import annotations

import math

import torch

import fastvae
from fastvae.ops.bernoulli.spec import LOGITS, TARGET
from fastvae.ops.bernoulli.spec import oracle_log_prob as oracle_bernoulli_log_prob
from fastvae.ops.elbo_spec import BETA, elbo_from
from fastvae.ops.gaussian.spec import LOGVAR, MU, reduce
from fastvae.ops.spec import Arg, OpSpec

ORACLE_SERIES_BELOW = 1e-2


def oracle_log_normalizer(logits):
    """log C(l) = log(l / tanh(l/2)) per element, in float64. The quotient has no cancellation
    away from l = 0, but the derivative autograd takes of it cancels as l -> 0, so |l| < 1e-2
    takes the Taylor series log 2 + l^2/12 - 7 l^4/1440 + 31 l^6/90720 (next term below 1e-20)."""
    small = logits.abs() < ORACLE_SERIES_BELOW
    l = torch.where(small, 1.0, logits)  # the branch not taken sees no 0/0 (nor its gradient)
    s = torch.where(small, logits, 0.0)
    p = s * s
    series = math.log(2.0) + p * (1 / 12 + p * (-7 / 1440 + p * (31 / 90720)))
    return torch.where(small, series, torch.log(l / torch.tanh(0.5 * l)))


def oracle_log_prob(logits, target):
    """log p(target | logits) per element: the Bernoulli's x*l - softplus(l) (torch.distributions,
    NaN for a target outside [0, 1]) plus the log-normalizer. Not torch.distributions'
    ContinuousBernoulli, which clamps its probabilities and is off by about 1% at |l| = 30 to 80."""
    return oracle_bernoulli_log_prob(logits, target) + oracle_log_normalizer(logits)


def eager_log_prob(logits, target):
    """What a user writes: torch.distributions (validation off, as a training loop that checked
    its data once runs it; the support check would add a pass, and a graph break compiled)."""
    return torch.distributions.ContinuousBernoulli(logits=logits, validate_args=False).log_prob(target)


OPS = (
    OpSpec(
        name="continuous_bernoulli_log_likelihood",
        inputs=(LOGITS, TARGET),
        outputs=(Arg("logp", (), kind="loss"),),
        fastvae=fastvae.continuous_bernoulli_log_likelihood,
        oracle=lambda logits, target, reduction="batchmean": reduce(oracle_log_prob(logits, target), reduction),
        eager=lambda logits, target, reduction="batchmean": reduce(eager_log_prob(logits, target), reduction),
        reductions=("none", "sum", "mean", "batchmean"),
    ),
    OpSpec(
        name="elbo_loss_continuous_bernoulli",
        inputs=(LOGITS, TARGET, MU, LOGVAR),
        outputs=(Arg("loss", (), kind="loss"),),
        fastvae=lambda logits, target, mu, logvar, reduction="batchmean": fastvae.elbo_loss(
            logits, target, mu, logvar, beta=BETA, reduction=reduction, likelihood="continuous_bernoulli"
        ),
        oracle=lambda logits, target, mu, logvar, reduction="batchmean": elbo_from(
            oracle_log_prob(logits, target), mu, logvar, reduction=reduction
        ),
        eager=lambda logits, target, mu, logvar, reduction="batchmean": elbo_from(
            eager_log_prob(logits, target), mu, logvar, reduction=reduction
        ),
        reductions=("none", "sum", "mean", "batchmean"),
    ),
)
