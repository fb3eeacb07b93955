"""nn.Module wrappers: drop-in like nn.BCEWithLogitsLoss."""

from __future__ import annotations

from torch import Tensor, nn

from fastvae.functional import elbo_loss
from fastvae.validation import check_beta, check_likelihood, check_reduction


class ELBOLoss(nn.Module):
    """The negative ELBO of a VAE: -log p(x|z) + beta * KL(q(z|x) || N(0, I)) (fastvae.elbo_loss).

    Args:
        beta: the KL's weight, a finite float >= 0 or a 0-d tensor.
        reduction: "none" ([B]), "sum", "mean" or "batchmean" (the mean over datapoints).
        likelihood: p(x|z): "bernoulli" (the default), "continuous_bernoulli" or "gaussian".

    forward(logits [B, ...], target [B, ...], mu [B, L], logvar [B, L]) -> loss, or
    forward(logits, target, kl=kl) with the [B] KL from fastvae.reparameterize_kl; for the
    Gaussian, logits is the mean and decoder_logvar= its log-variance (None: unit variance).

    Example:
        >>> criterion = fastvae.ELBOLoss(beta=1.0, likelihood="gaussian")
        >>> z, kl = fastvae.reparameterize_kl(mu, logvar)
        >>> loss = criterion(decoder(z), x, kl=kl, decoder_logvar=log_sigma2)
    """

    def __init__(self, beta: float | Tensor = 1.0, reduction: str = "batchmean",
                 likelihood: str = "bernoulli") -> None:
        super().__init__()
        check_reduction(reduction)
        check_beta(beta)
        check_likelihood(likelihood, None)
        self.beta = beta
        self.reduction = reduction
        self.likelihood = likelihood

    def forward(self, logits: Tensor, target: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None,
                *, kl: Tensor | None = None, decoder_logvar: Tensor | None = None) -> Tensor:
        return elbo_loss(logits, target, mu, logvar, kl=kl, beta=self.beta, reduction=self.reduction,
                         likelihood=self.likelihood, decoder_logvar=decoder_logvar)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}, likelihood={self.likelihood!r}"
