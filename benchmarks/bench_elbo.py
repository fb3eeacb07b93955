"""elbo_loss: the negative ELBO of a Bernoulli-decoder VAE, averaged over the batch.

Competitor: the loss as a user writes it in plain PyTorch, reconstruction term from
binary_cross_entropy_with_logits plus the closed-form Gaussian KL.
"""

import torch.nn.functional as F

import fastvae
from benchmarks.harness import OpBench, TensorSpec, run_case


def eager_elbo_loss(logits, target, mu, logvar):
    """logits, target [B, D]; mu, logvar [B, L] -> mean over B of (-log p(x|z) + KL)."""
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    return (recon + kl).mean()


def fastvae_elbo_loss(logits, target, mu, logvar):
    return fastvae.elbo_loss(logits, target, mu, logvar)


OP = OpBench(
    name="elbo_loss",
    inputs=(TensorSpec("logits", ("batch", "data"), scale=2.0),
            TensorSpec("target", ("batch", "data"), kind="target", binary=True),
            TensorSpec("mu", ("batch", "latent")),
            TensorSpec("logvar", ("batch", "latent"), scale=0.5)),
    outputs=(TensorSpec("loss", (), kind="loss"),),
    differentiable=("logits", "mu", "logvar"),
    eager=eager_elbo_loss,
    fastvae=fastvae_elbo_loss,
)


def test_elbo_loss(benchmark, case, device, bench_seconds):
    run_case(benchmark, OP, case, device, bench_seconds)
