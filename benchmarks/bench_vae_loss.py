"""vae_loss: everything a VAE step computes between encoder and optimizer except the
decoder itself: sample z ~ q(z|x) and the negative ELBO, forward and backward.

This is the setting of the native CPU target (elbo full including reparameterize_kl).
fastvae runs what its README shows: z and the KL from fastvae.reparameterize_kl, the
loss from fastvae.elbo_loss(logits, x, kl=kl) (two fused kernels: sampling with the
KL, and the Bernoulli log-likelihood with its gradient). The competitor is the plain
PyTorch a user writes (randn_like sampling, binary cross entropy with logits, the
closed-form KL). z is an output with
its own random upstream gradient, as the decoder hands one back in a real step; the
loss gets the upstream gradient 1, as from loss.backward().
"""

import torch
import torch.nn.functional as F

import fastvae
from benchmarks.bench_elbo import OP as ELBO
from benchmarks.harness import OpBench, TensorSpec, run_case


def eager_vae_loss(logits, target, mu, logvar):
    """logits, target [B, D]; mu, logvar [B, L] -> z [B, L], mean over B of (-log p(x|z) + KL)."""
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    return z, (recon + kl).mean()


def fastvae_vae_loss(logits, target, mu, logvar):
    z, kl = fastvae.reparameterize_kl(mu, logvar)
    return z, fastvae.elbo_loss(logits, target, kl=kl)


OP = OpBench(
    name="vae_loss",
    inputs=ELBO.inputs,  # the same tensors as elbo_loss; z is the extra output
    outputs=(TensorSpec("z", ("batch", "latent")),
             TensorSpec("loss", (), kind="loss")),
    differentiable=ELBO.differentiable,
    eager=eager_vae_loss,
    fastvae=fastvae_vae_loss,
)


def test_vae_loss(benchmark, case, device, bench_seconds):
    run_case(benchmark, OP, case, device, bench_seconds)
