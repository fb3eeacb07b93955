"""The `triton` backend: fused Triton kernels (CUDA; CPU under TRITON_INTERPRET=1).

Implements the backend contract documented in fastvae.backend; one file per op.
"""

from fastvae.triton.bernoulli import bernoulli_log_likelihood_forward
from fastvae.triton.gaussian_kl import gaussian_kl_forward
from fastvae.triton.reparameterize_kl import reparameterize_kl_backward, reparameterize_kl_forward

__all__ = [
    "bernoulli_log_likelihood_forward",
    "gaussian_kl_forward",
    "reparameterize_kl_backward",
    "reparameterize_kl_forward",
]
