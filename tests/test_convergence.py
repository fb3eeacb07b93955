"""A tiny VAE trained with fastvae ends where the same VAE trained with plain PyTorch ends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvae

from helpers import BACKENDS, DEVICE

STEPS, BATCH, DATA_DIM, LATENT_DIM, HIDDEN = 200, 32, 24, 4, 32


def _dataset() -> torch.Tensor:
    """Binary data with structure a VAE can learn: 4 prototypes, 10% of bits flipped."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(4, DATA_DIM, generator=g).round()
    picks = torch.randint(0, 4, (512,), generator=g)
    flips = (torch.rand(512, DATA_DIM, generator=g) < 0.1).float()
    return ((prototypes[picks] + flips) % 2).to(DEVICE)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(DATA_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 2 * LATENT_DIM)),
            "decoder": nn.Sequential(nn.Linear(LATENT_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DATA_DIM)),
        }
    ).to(DEVICE)


def _plain_pytorch_loss(model, x):
    mu, logvar = model["encoder"](x).chunk(2, dim=1)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    recon = F.binary_cross_entropy_with_logits(model["decoder"](z), x, reduction="sum") / x.shape[0]
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum() / x.shape[0]
    return recon + kl


def _fastvae_loss(model, x):
    mu, logvar = model["encoder"](x).chunk(2, dim=1)
    z, kl = fastvae.reparameterize_kl(mu, logvar)
    logp = fastvae.bernoulli_log_likelihood(model["decoder"](z), x)
    return kl.mean() - logp


def _train(loss_fn) -> list[float]:
    data, model = _dataset(), _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x = data[torch.randint(0, data.shape[0], (BATCH,))]
        loss = loss_fn(model, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def plain_losses() -> list[float]:
    return _train(_plain_pytorch_loss)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_with_fastvae_ends_at_the_plain_pytorch_loss(backend, plain_losses):
    with fastvae.use_backend(backend):
        losses = _train(_fastvae_loss)
    start = sum(losses[:10]) / 10
    end = sum(losses[-40:]) / 40
    plain_end = sum(plain_losses[-40:]) / 40
    assert end < 0.75 * start, f"fastvae did not learn: {start:.2f} -> {end:.2f}"
    # Different noise draws, so the curves differ step by step; their ends agree.
    assert abs(end - plain_end) < 0.05 * plain_end, f"fastvae ends at {end:.3f}, plain PyTorch at {plain_end:.3f}"
