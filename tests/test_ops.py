"""Every fused op on every backend against the float64 oracle: values and each gradient by name."""

from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae.ops import reparameterize_kl_op
from fastvae.reference import philox_normal
from helpers import (BACKENDS, DEVICE, DTYPES, assert_close_to, leaf, oracle_kl, oracle_logp,
                     oracle_z, rows_sum)

SHAPES = {
    "3x7": (3, 7),
    "41x401": (41, 401),
    "batch1": (1, 33),
    "image4d": (3, 1, 28, 28),
}
REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _reduce(elementwise: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return elementwise
    if reduction == "sum":
        return elementwise.sum()
    if reduction == "mean":
        return elementwise.sum() / max(elementwise.numel(), 1)
    return elementwise.sum() / max(elementwise.shape[0], 1)


def _latent(shape, dtype):
    mu = torch.randn(shape, device=DEVICE).to(dtype)
    logvar = (torch.randn(shape, device=DEVICE) * 1.5).to(dtype)
    return mu, logvar


def _upstream(out: torch.Tensor) -> torch.Tensor:
    """A random upstream gradient (not 1) shaped like `out`."""
    return torch.randn_like(out, dtype=torch.float32) + 0.5


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("given_eps", [True, False], ids=["eps", "philox"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_kl(backend, given_eps, dtype, shape):
    mu, logvar = map(leaf, _latent(shape, dtype))
    eps = torch.randn(shape, device=DEVICE).to(dtype) if given_eps else None
    with fastvae.use_backend(backend):
        z, kl, seed = reparameterize_kl_op(mu, logvar, eps, None)
        grad_z, grad_kl = _upstream(z).to(dtype), _upstream(kl)
        torch.autograd.backward([z, kl], [grad_z, grad_kl])
    if eps is None:
        eps = philox_normal(int(seed), tuple(shape), torch.float64, DEVICE)
    mu64, logvar64 = leaf(mu.double()), leaf(logvar.double())
    z64 = oracle_z(mu64, logvar64, eps)
    kl64 = rows_sum(oracle_kl(mu64, logvar64))
    torch.autograd.backward([z64, kl64], [grad_z.double(), grad_kl.double()])
    assert z.dtype == dtype and kl.dtype == torch.float32
    assert_close_to(z, z64, "z")
    assert_close_to(kl, kl64, "kl")
    assert_close_to(mu.grad, mu64.grad, "grad_mu")
    assert_close_to(logvar.grad, logvar64.grad, "grad_logvar")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_public_api_and_eps_gradient(backend):
    mu, logvar = map(leaf, _latent((5, 9), torch.float32))
    eps = leaf(torch.randn(5, 9, device=DEVICE))
    with fastvae.use_backend(backend):
        z = fastvae.reparameterize(mu, logvar, eps)
        z_kl, kl = fastvae.reparameterize_kl(mu, logvar, eps)
        grad = _upstream(z)
        z.backward(grad)
    mu64, logvar64, eps64 = leaf(mu.double()), leaf(logvar.double()), leaf(eps.double())
    z64 = oracle_z(mu64, logvar64, eps64)
    z64.backward(grad.double())
    assert_close_to(z, z64, "z")
    assert torch.equal(z, z_kl)
    assert_close_to(kl, rows_sum(oracle_kl(mu, logvar)), "kl")
    assert_close_to(eps.grad, eps64.grad, "grad_eps")
    assert_close_to(mu.grad, mu64.grad, "grad_mu")
    assert_close_to(logvar.grad, logvar64.grad, "grad_logvar")


@pytest.mark.parametrize("given_eps", [True, False], ids=["eps", "philox"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_kl_when_only_kl_is_used(backend, given_eps):
    """z unused: its gradient arrives as None and the backward uses the KL term alone."""
    mu, logvar = map(leaf, _latent((4, 13), torch.float32))
    eps = torch.randn(4, 13, device=DEVICE) if given_eps else None
    with fastvae.use_backend(backend):
        _, kl = fastvae.reparameterize_kl(mu, logvar, eps)
        grad_kl = _upstream(kl)
        kl.backward(grad_kl)
    mu64, logvar64 = leaf(mu.double()), leaf(logvar.double())
    rows_sum(oracle_kl(mu64, logvar64)).backward(grad_kl.double())
    assert_close_to(mu.grad, mu64.grad, "grad_mu")
    assert_close_to(logvar.grad, logvar64.grad, "grad_logvar")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_kl(backend, dtype, shape, reduction):
    mu, logvar = map(leaf, _latent(shape, dtype))
    with fastvae.use_backend(backend):
        kl = fastvae.gaussian_kl(mu, logvar, reduction=reduction)
        grad = _upstream(kl)
        kl.backward(grad)
    mu64, logvar64 = leaf(mu.double()), leaf(logvar.double())
    kl64 = _reduce(oracle_kl(mu64, logvar64), reduction)
    kl64.backward(grad.double())
    assert kl.dtype == torch.float32
    assert_close_to(kl, kl64, "kl")
    assert_close_to(mu.grad, mu64.grad, "grad_mu")
    assert_close_to(logvar.grad, logvar64.grad, "grad_logvar")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_bernoulli_log_likelihood(backend, dtype, shape, reduction):
    logits = leaf((torch.randn(shape, device=DEVICE) * 4).to(dtype))
    target = torch.rand(shape, device=DEVICE).to(dtype)  # continuous targets in [0, 1]
    target[..., ::2] = target[..., ::2].round()  # and binary ones
    with fastvae.use_backend(backend):
        logp = fastvae.bernoulli_log_likelihood(logits, target, reduction=reduction)
        grad = _upstream(logp)
        logp.backward(grad)
    logits64 = leaf(logits.double())
    logp64 = _reduce(oracle_logp(logits64, target), reduction)
    logp64.backward(grad.double())
    assert logp.dtype == torch.float32
    assert (logp <= 0).all()
    assert_close_to(logp, logp64, "logp")
    assert_close_to(logits.grad, logits64.grad, "grad_logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bernoulli_target_gradient(backend):
    logits, target = leaf(torch.randn(4, 6, device=DEVICE)), leaf(torch.rand(4, 6, device=DEVICE))
    with fastvae.use_backend(backend):
        fastvae.bernoulli_log_likelihood(logits, target, reduction="sum").backward()
    assert_close_to(target.grad, logits.detach().double(), "grad_target")  # dlogp/dx = logits


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_elbo_loss(backend, dtype, reduction):
    B, D, L = 6, 53, 11
    logits = leaf((torch.randn(B, D, device=DEVICE) * 3).to(dtype))
    target = torch.rand(B, D, device=DEVICE).round().to(dtype)
    mu, logvar = map(leaf, _latent((B, L), dtype))
    beta = 0.7
    with fastvae.use_backend(backend):
        loss = fastvae.ELBOLoss(beta=beta, reduction=reduction)(logits, target, mu, logvar)
        grad = _upstream(loss)
        loss.backward(grad)
    logits64, mu64, logvar64 = leaf(logits.double()), leaf(mu.double()), leaf(logvar.double())
    rows64 = -rows_sum(oracle_logp(logits64, target)) + beta * rows_sum(oracle_kl(mu64, logvar64))
    loss64 = {"none": rows64, "sum": rows64.sum()}.get(reduction, rows64.mean())
    loss64.backward(grad.double())
    assert loss.dtype == torch.float32
    assert_close_to(loss, loss64, "loss")
    assert_close_to(logits.grad, logits64.grad, "grad_logits")
    assert_close_to(mu.grad, mu64.grad, "grad_mu")
    assert_close_to(logvar.grad, logvar64.grad, "grad_logvar")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_elbo_loss_with_the_kl_from_reparameterize_kl(backend, reduction):
    """elbo_loss(logits, x, kl=kl): the sampled z and its KL from one kernel, the loss from the
    other, gradients through both into mu and logvar, against the float64 oracle."""
    B, D, L = 5, 37, 7
    logits, target = leaf(torch.randn(B, D, device=DEVICE) * 2), torch.rand(B, D, device=DEVICE)
    mu, logvar = map(leaf, _latent((B, L), torch.float32))
    eps = torch.randn(B, L, device=DEVICE)
    beta = 0.6
    with fastvae.use_backend(backend):
        z, kl = fastvae.reparameterize_kl(mu, logvar, eps)
        loss = fastvae.ELBOLoss(beta=beta, reduction=reduction)(logits, target, kl=kl)
        grad = _upstream(loss)
        grad_z = torch.randn(B, L, device=DEVICE)
        torch.autograd.backward([loss, z], [grad, grad_z])
    logits64, mu64, logvar64 = leaf(logits.double()), leaf(mu.double()), leaf(logvar.double())
    rows64 = -rows_sum(oracle_logp(logits64, target)) + beta * rows_sum(oracle_kl(mu64, logvar64))
    loss64 = {"none": rows64, "sum": rows64.sum()}.get(reduction, rows64.mean())
    z64 = oracle_z(mu64, logvar64, eps)
    torch.autograd.backward([loss64, z64], [grad.double(), grad_z.double()])
    assert_close_to(loss, loss64, "loss")
    for name, actual, expected in (("grad_logits", logits.grad, logits64.grad), ("grad_mu", mu.grad, mu64.grad),
                                   ("grad_logvar", logvar.grad, logvar64.grad)):
        assert_close_to(actual, expected, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    """bf16 activations from autocast beside fp32 targets and fp32 logvar."""
    logits = leaf(torch.randn(4, 30, device=DEVICE).bfloat16())
    target = torch.rand(4, 30, device=DEVICE)
    mu = leaf(torch.randn(4, 8, device=DEVICE).bfloat16())
    logvar = leaf(torch.randn(4, 8, device=DEVICE))
    with fastvae.use_backend(backend):
        loss = fastvae.elbo_loss(logits, target, mu, logvar)
        loss.backward()
    logits64, mu64, logvar64 = leaf(logits.double()), leaf(mu.double()), leaf(logvar.double())
    loss64 = (-rows_sum(oracle_logp(logits64, target)) + rows_sum(oracle_kl(mu64, logvar64))).mean()
    loss64.backward()
    assert_close_to(loss, loss64, "loss")
    assert logits.grad.dtype == torch.bfloat16 and logvar.grad.dtype == torch.float32
    assert_close_to(logits.grad, logits64.grad, "grad_logits")
    assert_close_to(mu.grad, mu64.grad, "grad_mu")
    assert_close_to(logvar.grad, logvar64.grad, "grad_logvar")
