"""The Gaussian log-likelihood's public ops as tests and benchmarks see them (fastvae.ops.spec)."""

from __future__ import annotations

import torch

import fastvae
from fastvae.ops.elbo_spec import BETA, elbo_from
from fastvae.ops.gaussian.spec import LOGVAR, MU, reduce
from fastvae.ops.spec import Arg, OpSpec

MEAN = Arg("mean", ("batch", "data"))
X = Arg("x", ("batch", "data"), kind="target", scale=1.5)  # any real data
DECODER_LOGVAR = Arg("decoder_logvar", ("batch", "data"), scale=1.5)  # a decoder's output
SHARED_LOGVAR = Arg("logvar", ("data",), scale=1.5)  # a learned per-feature parameter


def oracle_log_prob(mean, x, logvar=None):
    """log N(x; mean, exp(logvar)) per element from torch.distributions (logvar None: unit variance)."""
    scale = 1.0 if logvar is None else torch.exp(0.5 * logvar)
    return torch.distributions.Normal(mean, scale, validate_args=False).log_prob(x)


def eager_log_prob(mean, x, logvar=None):
    """What a user writes: torch.distributions (validation off, as in a training loop: its
    checks read the values, which costs a pass and, compiled, a graph break)."""
    scale = 1.0 if logvar is None else logvar.mul(0.5).exp()
    return torch.distributions.Normal(mean, scale, validate_args=False).log_prob(x)


def _log_likelihood_spec(name, inputs, benchmark=True):
    """gaussian_log_likelihood with the log-variance `inputs` give (none: unit variance)."""
    return OpSpec(
        name=name,
        inputs=inputs,
        outputs=(Arg("logp", (), kind="loss"),),
        fastvae=lambda mean, x, *logvar, reduction="batchmean": fastvae.gaussian_log_likelihood(
            mean, x, *logvar, reduction=reduction
        ),
        oracle=lambda mean, x, *logvar, reduction="batchmean": reduce(oracle_log_prob(mean, x, *logvar), reduction),
        eager=lambda mean, x, *logvar, reduction="batchmean": reduce(eager_log_prob(mean, x, *logvar), reduction),
        reductions=("none", "sum", "mean", "batchmean"),
        benchmark=benchmark,
    )


OPS = (
    _log_likelihood_spec("gaussian_log_likelihood", (MEAN, X, DECODER_LOGVAR)),
    _log_likelihood_spec("gaussian_log_likelihood_shared_logvar", (MEAN, X, SHARED_LOGVAR)),
    _log_likelihood_spec("gaussian_log_likelihood_unit_variance", (MEAN, X), benchmark=False),
    OpSpec(
        name="elbo_loss_gaussian",
        inputs=(MEAN, X, MU, LOGVAR, DECODER_LOGVAR),
        outputs=(Arg("loss", (), kind="loss"),),
        fastvae=lambda mean, x, mu, logvar, decoder_logvar, reduction="batchmean": fastvae.elbo_loss(
            mean, x, mu, logvar, beta=BETA, reduction=reduction, likelihood="gaussian", decoder_logvar=decoder_logvar
        ),
        oracle=lambda mean, x, mu, logvar, decoder_logvar, reduction="batchmean": elbo_from(
            oracle_log_prob(mean, x, decoder_logvar), mu, logvar, reduction=reduction
        ),
        eager=lambda mean, x, mu, logvar, decoder_logvar, reduction="batchmean": elbo_from(
            eager_log_prob(mean, x, decoder_logvar), mu, logvar, reduction=reduction
        ),
        reductions=("none", "sum", "mean", "batchmean"),
    ),
)
