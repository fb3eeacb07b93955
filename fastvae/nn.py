"""nn.Module wrappers: drop-in like nn.BCEWithLogitsLoss."""

from __future__ import annotations

from torch import Tensor, nn

from fastvae.functional import elbo_loss, iwae_loss
from fastvae.ops.iwae.op import ESTIMATORS
from fastvae.validation import check_beta, check_choice, check_likelihood, check_reduction


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

    def __init__(self, beta: float | Tensor = 1.0, reduction: str = "batchmean", likelihood: str = "bernoulli") -> None:
        super().__init__()
        check_reduction(reduction)
        check_beta(beta)
        check_likelihood(likelihood, None)
        self.beta = beta
        self.reduction = reduction
        self.likelihood = likelihood

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        mu: Tensor | None = None,
        logvar: Tensor | None = None,
        *,
        kl: Tensor | None = None,
        decoder_logvar: Tensor | None = None,
    ) -> Tensor:
        return elbo_loss(
            logits,
            target,
            mu,
            logvar,
            kl=kl,
            beta=self.beta,
            reduction=self.reduction,
            likelihood=self.likelihood,
            decoder_logvar=decoder_logvar,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}, likelihood={self.likelihood!r}"


class IWAELoss(nn.Module):
    """The negative importance-weighted bound (IWAE) on K samples per datapoint; see fastvae.iwae_loss.

    Args:
        likelihood: the decoder's likelihood, "bernoulli", "continuous_bernoulli" or "gaussian".
        estimator: "iwae" (the bound's own gradients) or "dreg" (doubly-reparameterized
            gradients for the encoder).
        reduction: "none" ([B]), "sum", "mean" or "batchmean" (the mean over datapoints).

    forward(logits [K, B, ...], x [B, ...], z [K, B, L], mu [B, L], logvar [B, L], *, decoder_logvar=None)
    -> loss (decoder_logvar: the Gaussian's, see fastvae.iwae_loss).

    Example:
        >>> criterion = fastvae.IWAELoss(estimator="dreg")
        >>> z = fastvae.reparameterize(mu, logvar, samples=5)
        >>> loss = criterion(decoder(z), x, z, mu, logvar)
    """

    def __init__(self, likelihood: str = "bernoulli", estimator: str = "iwae", reduction: str = "batchmean") -> None:
        super().__init__()
        check_likelihood(likelihood, None)
        check_choice("estimator", estimator, ESTIMATORS)
        check_reduction(reduction)
        self.likelihood, self.estimator, self.reduction = likelihood, estimator, reduction

    def forward(
        self, logits: Tensor, x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, *, decoder_logvar: Tensor | None = None
    ) -> Tensor:
        return iwae_loss(
            logits,
            x,
            z,
            mu,
            logvar,
            likelihood=self.likelihood,
            estimator=self.estimator,
            reduction=self.reduction,
            decoder_logvar=decoder_logvar,
        )

    def extra_repr(self) -> str:
        return f"likelihood={self.likelihood!r}, estimator={self.estimator!r}, reduction={self.reduction!r}"
