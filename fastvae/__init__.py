"""fastvae: fused Triton and native CPU kernels for variational autoencoders.

import fastvae
z, kl = fastvae.reparameterize_kl(mu, logvar)          # one pass: sample and KL [B]
loss = -fastvae.bernoulli_log_likelihood(logits, x) + kl.mean()
loss = fastvae.elbo_loss(logits, x, mu, logvar)         # or all at once
z = fastvae.reparameterize(mu, logvar, samples=5)        # K = 5 samples: [5, B, L]
loss = fastvae.iwae_loss(decoder(z), x, z, mu, logvar)  # the importance-weighted bound
"""

from fastvae.backend import available_backends, use_backend
from fastvae.compiler import compile_options, skip_fastvae_code_guards
from fastvae.errors import BackendUnavailableError
from fastvae.functional import (
    bernoulli_log_likelihood,
    continuous_bernoulli_log_likelihood,
    elbo_loss,
    elbo_terms,
    gaussian_kl,
    gaussian_log_likelihood,
    iwae_loss,
    reparameterize,
    reparameterize_kl,
)
from fastvae.nn import ELBOLoss, IWAELoss
from fastvae.validation import set_validate_args

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ELBOLoss",
    "IWAELoss",
    "available_backends",
    "bernoulli_log_likelihood",
    "compile_options",
    "continuous_bernoulli_log_likelihood",
    "elbo_loss",
    "elbo_terms",
    "gaussian_kl",
    "gaussian_log_likelihood",
    "iwae_loss",
    "reparameterize",
    "reparameterize_kl",
    "set_validate_args",
    "skip_fastvae_code_guards",
    "use_backend",
]
