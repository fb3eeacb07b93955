"""nn.Module wrappers: drop-in like nn.BCEWithLogitsLoss."""

from __future__ import annotations

from torch import Tensor, nn

from fastvae.functional import _check_reduction, elbo_loss


class ELBOLoss(nn.Module):
    """The negative ELBO of a Bernoulli-decoder VAE: -log p(x|z) + beta * KL(q(z|x) || N(0, I)).

    forward(logits [B, ...], target [B, ...], mu [B, L], logvar [B, L]) -> loss
    (a scalar, or [B] with reduction="none"); or forward(logits, target, kl=kl) with the
    [B] KL from fastvae.reparameterize_kl.
    """

    def __init__(self, beta: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        _check_reduction(reduction)
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (it weights the KL term), got {beta}")
        self.beta = beta
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None,
                *, kl: Tensor | None = None) -> Tensor:
        return elbo_loss(logits, target, mu, logvar, kl=kl, beta=self.beta, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}"
