"""The negative ELBO of any likelihood as tests and benchmarks see it (fastvae.ops.spec): elbo_loss's
reductions, built on the likelihood's per-element log p (a float64 oracle's for the oracle,
torch.distributions' for the plain PyTorch a user writes)."""

from __future__ import annotations

from torch import Tensor

from fastvae.ops.gaussian.spec import oracle_kl, reduce

BETA = 0.7  # the KL weight the ELBO specs pass: not 1, so a dropped beta shows


def elbo_from(log_prob: Tensor, mu: Tensor, logvar: Tensor, beta: float = BETA, reduction: str = "batchmean") -> Tensor:
    """-sum log p(x|z) + beta * KL(N(mu, exp(logvar)) || N(0, I)) per datapoint [B] (log p [B, ...]
    per element, mu and logvar [B, L]), reduced as elbo_loss does: "mean" and "batchmean" both
    average over datapoints."""
    rows = -log_prob.flatten(1).sum(1) + beta * oracle_kl(mu, logvar).flatten(1).sum(1)
    return rows if reduction == "none" else reduce(rows, "sum" if reduction == "sum" else "batchmean")
