"""fastvae: fused Triton and native CPU kernels for variational autoencoders.

    import fastvae
    z, kl = fastvae.reparameterize_kl(mu, logvar)          # one pass: sample and KL [B]
    loss = -fastvae.bernoulli_log_likelihood(logits, x) + kl.mean()
    loss = fastvae.elbo_loss(logits, x, mu, logvar)         # or all at once
"""

from fastvae.backend import available_backends, use_backend
from fastvae.errors import BackendUnavailableError
from fastvae.functional import (
    bernoulli_log_likelihood,
    continuous_bernoulli_log_likelihood,
    elbo_loss,
    elbo_terms,
    gaussian_kl,
    gaussian_log_likelihood,
    reparameterize,
    reparameterize_kl,
)
from fastvae.nn import ELBOLoss
from fastvae.validation import set_validate_args

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ELBOLoss",
    "available_backends",
    "bernoulli_log_likelihood",
    "continuous_bernoulli_log_likelihood",
    "elbo_loss",
    "elbo_terms",
    "gaussian_kl",
    "gaussian_log_likelihood",
    "reparameterize",
    "reparameterize_kl",
    "set_validate_args",
    "use_backend",
]
