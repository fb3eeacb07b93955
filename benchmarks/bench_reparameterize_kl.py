"""reparameterize_kl: z = mu + exp(0.5*logvar) * eps and the per-datapoint KL to N(0, I).

Competitor: the two lines a user writes in plain PyTorch (noise from randn_like, the
KL summed over the latent dim); fastvae draws its noise inside the fused kernel.
"""

import torch

import fastvae
from benchmarks.harness import OpBench, TensorSpec, run_case


def eager_reparameterize_kl(mu, logvar):
    """mu, logvar [B, L] -> z [B, L], kl [B]."""
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    return z, kl


def fastvae_reparameterize_kl(mu, logvar):
    return fastvae.reparameterize_kl(mu, logvar)


OP = OpBench(
    name="reparameterize_kl",
    inputs=(TensorSpec("mu", ("batch", "latent")),
            TensorSpec("logvar", ("batch", "latent"), scale=0.5)),
    outputs=(TensorSpec("z", ("batch", "latent")),
             TensorSpec("kl", ("batch",), kind="loss")),
    differentiable=("mu", "logvar"),
    eager=eager_reparameterize_kl,
    fastvae=fastvae_reparameterize_kl,
)


def test_reparameterize_kl(benchmark, case, device, bench_seconds):
    run_case(benchmark, OP, case, device, bench_seconds)
