"""The in-kernel Philox noise: reproducible, standard normal, uncorrelated, the same on every backend."""

from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae.ops.gaussian.op import reparameterize_kl_fused, reparameterize_kl_op
from fastvae.ops.noise import philox_normal, philox_uint32x4

from helpers import BACKENDS, DEVICE, assert_close_to

N_ROWS, N_COLS = 256, 129  # 33k samples: statistics resolve to about 0.006 per standard error


def _noise(backend: str, generator=None) -> torch.Tensor:
    """eps itself: z with mu = 0 and logvar = 0."""
    zeros = torch.zeros(N_ROWS, N_COLS, device=DEVICE)
    with fastvae.use_backend(backend):
        return fastvae.reparameterize(zeros, zeros, generator=generator).double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_standard_normal_and_uncorrelated(backend):
    eps = _noise(backend)
    n = eps.numel()
    bound = 5 / n**0.5  # five standard errors
    assert abs(eps.mean().item()) < bound
    assert abs(eps.std().item() - 1) < 5 * (0.5 / n) ** 0.5
    # Fourth moment 3 rules out a uniform or clipped stream with the right variance.
    assert abs((eps**4).mean().item() - 3) < 5 * (96 / n) ** 0.5
    flat = eps.flatten()
    neighbours = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    next_row = torch.corrcoef(torch.stack([eps[:-1].flatten(), eps[1:].flatten()]))[0, 1].item()
    across_calls = torch.corrcoef(torch.stack([flat, _noise(backend).flatten()]))[0, 1].item()
    for name, corr in {"neighbours": neighbours, "next row": next_row, "across calls": across_calls}.items():
        assert abs(corr) < bound, f"correlation between {name}: {corr:.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_manual_seed_reproduces_and_generator_is_honoured(backend):
    torch.manual_seed(123)
    first = _noise(backend)
    torch.manual_seed(123)
    again = _noise(backend)
    later = _noise(backend)
    assert torch.equal(first, again)
    assert not torch.equal(first, later)
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(_noise(backend, gen_a), _noise(backend, gen_b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_noise_as_the_reference_stream(backend):
    zeros = torch.zeros(33, 65, device=DEVICE)
    seed = torch.tensor(2**40 + 12345, device=DEVICE)  # high key word non-zero
    with fastvae.use_backend(backend):
        z, _, used = reparameterize_kl_op(zeros, zeros, None, seed, None)
    assert int(used) == int(seed)
    expected = philox_normal(int(seed), (33, 65), torch.float64, DEVICE)
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_regenerates_the_forward_noise(backend):
    """grad_logvar = 0.5 * (z - mu) holds only if backward redraws exactly the forward eps."""
    mu = torch.randn(17, 23, device=DEVICE, requires_grad=True)
    logvar = torch.randn(17, 23, device=DEVICE, requires_grad=True)
    with fastvae.use_backend(backend):
        z = fastvae.reparameterize(mu, logvar)
        z.sum().backward()
    torch.testing.assert_close(logvar.grad, 0.5 * (z - mu).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_draw_what_copies_of_the_rows_draw(backend):
    """samples=K is K copies of the rows through the one-sample kernel: the same noise (flat index
    (k * B + b) * L + j), the same KL, and gradients that are the copies' gradients summed,
    with the KL's gradient once; all against the float64 oracle."""
    samples, rows, cols = 3, 5, 37
    generator = torch.Generator().manual_seed(11)
    mu = torch.randn(rows, cols, generator=generator).to(DEVICE).requires_grad_()
    logvar = torch.randn(rows, cols, generator=generator).to(DEVICE).requires_grad_()
    grad_z = torch.randn(samples, rows, cols, generator=generator).to(DEVICE)
    grad_kl = torch.rand(rows, generator=generator).to(DEVICE) + 0.5
    seed = torch.tensor(2**40 + 99, device=DEVICE)
    copies = [t.detach().repeat(samples, 1).requires_grad_() for t in (mu, logvar)]
    with fastvae.use_backend(backend):
        z, kl, _ = reparameterize_kl_fused(mu, logvar, None, seed, samples)
        grad_mu, grad_logvar = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))
        z_copies, kl_copies, _ = reparameterize_kl_fused(*copies, None, seed, None)
        copy_grads = torch.autograd.grad(z_copies, copies, grad_z.reshape(samples * rows, cols))
    assert z.shape == (samples, rows, cols) and kl.shape == (rows,)
    assert torch.equal(z.reshape(samples * rows, cols), z_copies)
    assert torch.equal(kl, kl_copies[:rows])
    mu64, logvar64 = mu.detach().double(), logvar.detach().double()
    eps = philox_normal(int(seed), (samples, rows, cols), torch.float64, DEVICE)
    half_std = 0.5 * torch.exp(0.5 * logvar64)
    expected_mu = grad_z.double().sum(0) + grad_kl.double()[:, None] * mu64
    expected_logvar = half_std * (grad_z.double() * eps).sum(0) + grad_kl.double()[:, None] * 0.5 * torch.expm1(
        logvar64
    )
    assert_close_to(z, mu64 + 2 * half_std * eps, "z")
    assert_close_to(grad_mu, expected_mu, "grad_mu")
    assert_close_to(grad_logvar, expected_logvar, "grad_logvar")
    for name, summed, total, kl_term in (
        ("mu", copy_grads[0], grad_mu, grad_kl[:, None] * mu),
        ("logvar", copy_grads[1], grad_logvar, grad_kl[:, None] * 0.5 * torch.expm1(logvar)),
    ):
        torch.testing.assert_close(
            summed.reshape(samples, rows, cols).sum(0) + kl_term.detach(),
            total,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, name=name: f"grad_{name}: {m}",
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_with_the_callers_eps(backend):
    """eps [K, B, L] with samples=K: z[k] = mu + std * eps[k], and eps gets its gradient."""
    samples, rows, cols = 2, 4, 9
    mu, logvar = torch.randn(rows, cols, device=DEVICE), torch.randn(rows, cols, device=DEVICE)
    eps = torch.randn(samples, rows, cols, device=DEVICE, requires_grad=True)
    with fastvae.use_backend(backend):
        z = fastvae.reparameterize(mu, logvar, eps, samples=samples)
        (grad_eps,) = torch.autograd.grad(z, eps, torch.ones_like(z))
    std64 = torch.exp(0.5 * logvar.double())
    assert_close_to(z, mu.double() + std64 * eps.detach().double(), "z")
    assert_close_to(grad_eps, std64.expand(samples, rows, cols), "grad_eps")


def test_philox_reference_matches_known_answer():
    """Random123's published Philox4x32-10 known-answer vector: counter = key = 0."""
    words = philox_uint32x4(0, torch.zeros(1, dtype=torch.int64))
    assert tuple(w.item() for w in words) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
