"""The importance-weighted bound's public op as tests and benchmarks see it (fastvae.ops.spec).

The oracles are written from the papers' formulas with torch.distributions, in float64: the
IWAE bound (Burda et al.) and its gradients by autograd, and DReG (Tucker et al.) in its
surrogate-loss form, independently of fastvae.ops.iwae.op's explicit gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Normal

import fastvae
from fastvae.ops.bernoulli.spec import oracle_log_prob
from fastvae.ops.continuous_bernoulli.spec import oracle_log_prob as oracle_cb_log_prob
from fastvae.ops.gaussian.spec import LOGVAR, MU, reduce
from fastvae.ops.gaussian_likelihood.spec import oracle_log_prob as oracle_gaussian_log_prob
from fastvae.ops.spec import Arg, OpSpec

LOGITS = Arg("logits", ("samples", "batch", "data"), scale=3.0)
X = Arg("x", ("batch", "data"), kind="target", values="unit")
Z = Arg("z", ("samples", "batch", "latent"))
# The Gaussian's inputs are sized as a trained decoder's are, so that log p(x | z) summed over the
# data stays within the float32 budget of FLOAT32_WEIGHTS_TOLERANCE (a standard deviation of e^-2
# with x four away from the mean would give |log p| ~ 10^5).
MEANS = Arg("mean", ("samples", "batch", "data"))
REAL_X = Arg("x", ("batch", "data"), kind="target")  # any real data
SAMPLE_LOGVAR = Arg("decoder_logvar", ("samples", "batch", "data"), scale=0.5)  # a decoder's output
PIXEL_LOGVAR = Arg("decoder_logvar", ("data",), scale=0.5)  # a learned per-feature parameter


def oracle_log_weights(logits, x, z, mu, logvar, log_prob=oracle_log_prob):
    """log w [K, B] = log p(x | logits) + log N(z; 0, I) - log N(z; mu, exp(logvar)), each from
    torch.distributions (NaN for data outside [0, 1], as fastvae defines the Bernoulli), or the
    likelihood's own oracle `log_prob`."""
    log_px = log_prob(logits, x.expand_as(logits)).flatten(2).sum(-1)
    log_pz = Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).flatten(2).sum(-1)
    log_qz = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).flatten(2).sum(-1)
    return log_px + log_pz - log_qz


def oracle_iwae_rows(logits, x, z, mu, logvar, log_prob=oracle_log_prob):
    """-(logsumexp_k log w - log K) per datapoint [B]; autograd of it gives the IWAE gradients."""
    log_weights = oracle_log_weights(logits, x, z, mu, logvar, log_prob)
    return -(torch.logsumexp(log_weights, dim=0) - math.log(logits.shape[0]))


def oracle_dreg_rows(logits, x, z, mu, logvar):
    """The IWAE rows' value, with DReG's gradients from the surrogate losses of Tucker et al.:
    the encoder's surrogate -sum_k stop(w~_k^2) log w_k(z_k), with log q's parameters (and the
    decoder) stopped, so only z gets its gradient; the decoder's -sum_k stop(w~_k) log p(x | l_k).
    mu and logvar get none (0 * their sum keeps them in the graph, so autograd gives zeros)."""
    value = oracle_iwae_rows(logits, x, z, mu, logvar)
    weights = torch.softmax(oracle_log_weights(logits, x, z, mu, logvar), dim=0).detach()
    encoder = -(weights**2 * oracle_log_weights(logits.detach(), x, z, mu.detach(), logvar.detach())).sum(0)
    decoder = -(weights * oracle_log_prob(logits, x.expand_as(logits)).flatten(2).sum(-1)).sum(0)
    surrogate = encoder + decoder
    return value.detach() + (surrogate - surrogate.detach()) + 0.0 * (mu.sum() + logvar.sum())


def _reduce_rows(rows, reduction):
    """iwae_loss's reductions: "mean" and "batchmean" are the mean over datapoints."""
    return rows if reduction == "none" else reduce(rows, "sum" if reduction == "sum" else "batchmean")


def _eager_bound(log_px, z, mu, logvar, reduction):
    """The rest of the bound as a user writes it: the two Gaussian log-densities, logsumexp over the samples."""
    samples = log_px.shape[0]
    log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(2).sum(-1)
    log_qz = -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi)).flatten(2).sum(-1)
    rows = math.log(samples) - torch.logsumexp(log_px + log_pz - log_qz, dim=0)
    return _reduce_rows(rows, reduction)


def eager_iwae_loss(logits, x, z, mu, logvar, reduction="batchmean"):
    """The bound as a user writes it: x expanded to the K samples, BCE with logits, the two Gaussian
    log-densities, logsumexp over the samples."""
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(2).sum(-1)
    return _eager_bound(log_px, z, mu, logvar, reduction)


def eager_gaussian_iwae_loss(mean, x, z, mu, logvar, decoder_logvar, reduction="batchmean"):
    """The Gaussian bound as a user writes it: torch.distributions.Normal (validation off, as in a
    training loop) broadcasting x and the decoder's log-variance over the K samples."""
    scale = decoder_logvar.mul(0.5).exp()
    log_px = torch.distributions.Normal(mean, scale, validate_args=False).log_prob(x).flatten(2).sum(-1)
    return _eager_bound(log_px, z, mu, logvar, reduction)


REDUCTIONS = ("none", "sum", "mean", "batchmean")
# The normalized weights are a softmax over log-likelihoods summed over D elements, and an error in
# a log weight reaches every gradient as a relative error of the same size. In float32 such a sum
# (|log p| ~ 1700 at the tests' D = 1100) carries an error that depends on the order of its
# additions, bounded by about log2(D) * eps * 1700 = 2e-3: 8e-5 was measured on the CPU backends
# (the torch reference included), 2.6e-4 with Triton's blocked sums on an H200.
FLOAT32_WEIGHTS_TOLERANCE = 5e-4


def _gaussian_spec(name, decoder_logvar, benchmark):
    """iwae_loss with likelihood="gaussian": the decoder gives the mean, and its log-variance is
    `decoder_logvar` (an output per sample, or a parameter that broadcasts)."""

    def fused(mean, x, z, mu, logvar, decoder_logvar, reduction="batchmean"):
        return fastvae.iwae_loss(
            mean, x, z, mu, logvar, likelihood="gaussian", decoder_logvar=decoder_logvar, reduction=reduction
        )

    def oracle(mean, x, z, mu, logvar, decoder_logvar, reduction="batchmean"):
        def log_prob(mean_k, x_k):
            return oracle_gaussian_log_prob(mean_k, x_k, decoder_logvar)

        return _reduce_rows(oracle_iwae_rows(mean, x, z, mu, logvar, log_prob=log_prob), reduction)

    return OpSpec(
        name=name,
        inputs=(MEANS, REAL_X, Z, MU, LOGVAR, decoder_logvar),
        outputs=(Arg("loss", (), kind="loss"),),
        fastvae=fused,
        oracle=oracle,
        eager=eager_gaussian_iwae_loss if benchmark else None,
        reductions=REDUCTIONS,
        min_tolerance=FLOAT32_WEIGHTS_TOLERANCE,
        benchmark=benchmark,
    )


OPS = (
    OpSpec(
        name="iwae_loss",
        inputs=(LOGITS, X, Z, MU, LOGVAR),
        outputs=(Arg("loss", (), kind="loss"),),
        fastvae=fastvae.iwae_loss,
        oracle=lambda *inputs, reduction="batchmean": _reduce_rows(oracle_iwae_rows(*inputs), reduction),
        eager=eager_iwae_loss,
        reductions=REDUCTIONS,
        min_tolerance=FLOAT32_WEIGHTS_TOLERANCE,
    ),
    OpSpec(
        name="iwae_loss_dreg",
        inputs=(LOGITS, X, Z, MU, LOGVAR),
        outputs=(Arg("loss", (), kind="loss"),),
        fastvae=lambda *inputs, reduction="batchmean": fastvae.iwae_loss(
            *inputs, estimator="dreg", reduction=reduction
        ),
        oracle=lambda *inputs, reduction="batchmean": _reduce_rows(oracle_dreg_rows(*inputs), reduction),
        reductions=REDUCTIONS,
        min_tolerance=FLOAT32_WEIGHTS_TOLERANCE,
        benchmark=False,  # the same kernel and forward as iwae_loss; only the [K, B, L] backward differs
    ),
    OpSpec(
        name="iwae_loss_continuous_bernoulli",
        inputs=(LOGITS, X, Z, MU, LOGVAR),
        outputs=(Arg("loss", (), kind="loss"),),
        fastvae=lambda *inputs, reduction="batchmean": fastvae.iwae_loss(
            *inputs, likelihood="continuous_bernoulli", reduction=reduction
        ),
        oracle=lambda *inputs, reduction="batchmean": _reduce_rows(
            oracle_iwae_rows(*inputs, log_prob=oracle_cb_log_prob), reduction
        ),
        reductions=REDUCTIONS,
        min_tolerance=FLOAT32_WEIGHTS_TOLERANCE,
        benchmark=False,  # the bound's kernels are iwae_loss's; the likelihood's are benchmarked on their own
    ),
    _gaussian_spec("iwae_loss_gaussian", SAMPLE_LOGVAR, benchmark=False),
    # The shape fastvae-train learns: one log-variance per pixel, shared by every datapoint and sample.
    _gaussian_spec("iwae_loss_gaussian_pixel_logvar", PIXEL_LOGVAR, benchmark=True),
)
