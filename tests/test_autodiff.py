"""Autodiff beyond one backward: double backward (gradient penalties, gradgradcheck), forward-mode
AD and every torch.func transform, on every backend, against plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import fastvae

from helpers import BACKENDS, DEVICE

F64 = {"device": DEVICE, "dtype": torch.float64}
SEED = torch.tensor(2024, device=DEVICE)


def _eps(shape):
    return torch.randn(shape, **F64)


# The ops as functions of float64 tensors, each beside the same math in plain PyTorch.
def fused_elbo(logits, mu, logvar, target):
    return fastvae.elbo_loss(logits, target, mu, logvar, beta=0.7)


def plain_elbo(logits, mu, logvar, target):
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    return (recon + 0.7 * kl).mean()


def fused_elbo_with(likelihood):
    """elbo_loss with `likelihood`, as a function of the decoder output, mu, logvar (and for the
    Gaussian its log-variance, a learned per-feature parameter [D] here)."""

    def loss(output, mu, logvar, target, *decoder_logvar):
        return fastvae.elbo_loss(
            output,
            target,
            mu,
            logvar,
            beta=0.7,
            likelihood=likelihood,
            decoder_logvar=decoder_logvar[0] if decoder_logvar else None,
        )

    return loss


def plain_continuous_bernoulli(logits, target):
    """x*l - softplus(l) + log(l / tanh(l/2)) per element: exact in float64 for logits away from 0."""
    return target * logits - F.softplus(logits) + torch.log(logits / torch.tanh(0.5 * logits))


def plain_gaussian(mean, x, logvar):
    return torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(x)


def plain_elbo_with(log_prob):
    def loss(output, mu, logvar, target, *decoder_logvar):
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
        return (-log_prob(output, target, *decoder_logvar).sum(1) + 0.7 * kl).mean()

    return loss


def fused_sample(mu, logvar, eps):
    z, kl = fastvae.reparameterize_kl(mu, logvar, eps)
    return (z.sin() * 1.3).sum() + (kl * kl).sum()


def plain_sample(mu, logvar, eps):
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    return (z.sin() * 1.3).sum() + (kl * kl).sum()


def fused_samples(mu, logvar, eps):
    z, kl = fastvae.reparameterize_kl(mu, logvar, eps, samples=eps.shape[0])
    return (z.sin() * 1.3).sum() + (kl * kl).sum()


def _iwae_inputs():
    """logits [K, B, D], z [K, B, L] (K = 2, B = 3, D = 7, L = 4) beside _elbo_inputs' mu and logvar."""
    return torch.randn(2, 3, 7, **F64) * 2, torch.randn(2, 3, 4, **F64)


def fused_iwae(logits, z, mu, logvar, target, estimator="iwae"):
    return fastvae.iwae_loss(logits, target, z, mu, logvar, estimator=estimator)


def _plain_log_weights(logits, z, mu, logvar, target):
    """log w [K, B]; the two log(2 pi) of the Gaussian densities cancel."""
    log_px = -F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none").sum(-1)
    return log_px - 0.5 * (z.pow(2) - (z - mu).pow(2) / logvar.exp() - logvar).sum(-1)


def plain_iwae(logits, z, mu, logvar, target):
    return (math.log(logits.shape[0]) - torch.logsumexp(_plain_log_weights(logits, z, mu, logvar, target), 0)).mean()


def plain_dreg(logits, z, mu, logvar, target):
    """The IWAE value with DReG's gradients, from the surrogate losses (weights detached; the
    encoder's with log q's parameters and the decoder's output detached)."""
    weights = torch.softmax(_plain_log_weights(logits, z, mu, logvar, target), 0).detach()
    encoder = -(weights**2 * _plain_log_weights(logits.detach(), z, mu.detach(), logvar.detach(), target))
    log_px = -F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none").sum(-1)
    surrogate = (encoder - weights * log_px).sum(0).mean()
    value = plain_iwae(logits, z, mu, logvar, target)
    return value.detach() + (surrogate - surrogate.detach()) + 0.0 * (mu.sum() + logvar.sum())


def _elbo_inputs():
    return (
        torch.randn(3, 7, **F64) * 2,
        torch.randn(3, 4, **F64),
        torch.randn(3, 4, **F64),
        torch.rand(3, 7, **F64).round(),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_every_op(backend):
    logits, mu, logvar, target = (t.requires_grad_(i < 3) for i, t in enumerate(_elbo_inputs()))
    eps = _eps((3, 4)).requires_grad_()
    logvar_d, logvar_full = torch.randn(7, **F64).requires_grad_(), torch.randn(3, 7, **F64).requires_grad_()
    samples_logits, z = (t.requires_grad_() for t in _iwae_inputs())
    with fastvae.use_backend(backend):
        cases = [
            (
                lambda lk, zk, m, v: fastvae.iwae_loss(lk, target, zk, m, v, reduction="none"),
                (samples_logits, z, mu, logvar),
            ),
            (lambda l: fastvae.bernoulli_log_likelihood(l, target, "sum"), (logits,)),
            (lambda l: fastvae.bernoulli_log_likelihood(l, target, "none"), (logits,)),
            (lambda m, v: fastvae.gaussian_kl(m, v, "none"), (mu, logvar)),
            (lambda m, v: fastvae.gaussian_kl(m, v), (mu, logvar)),
            (lambda m, v, e: fastvae.reparameterize_kl(m, v, e), (mu, logvar, eps)),
            (lambda l, m, v: fused_elbo(l, m, v, target), (logits, mu, logvar)),
            (lambda l: fastvae.continuous_bernoulli_log_likelihood(l, target, reduction="sum"), (logits,)),
            (lambda l: fastvae.continuous_bernoulli_log_likelihood(l, target, reduction="none"), (logits,)),
            (lambda m, v: fastvae.gaussian_log_likelihood(m, target, v, reduction="sum"), (logits, logvar_d)),
            (lambda m, v: fastvae.gaussian_log_likelihood(m, target, v, reduction="none"), (logits, logvar_full)),
            (lambda m: fastvae.gaussian_log_likelihood(m, target), (logits,)),
            (lambda l, m, v: fused_elbo_with("continuous_bernoulli")(l, m, v, target), (logits, mu, logvar)),
            (lambda l, m, v, d: fused_elbo_with("gaussian")(l, m, v, target, d), (logits, mu, logvar, logvar_d)),
        ]
        for fn, inputs in cases:
            assert torch.autograd.gradgradcheck(fn, inputs)
        # The Philox path: the noise is regenerated from the seed in both backwards.
        from fastvae.ops.gaussian.op import reparameterize_kl_fused

        # One sample, and K samples per row (backward sums them inside the kernel).
        for samples in (None, 3):

            def sample(m, v, samples=samples):
                return reparameterize_kl_fused(m, v, None, SEED, samples)[:2]

            assert torch.autograd.gradgradcheck(sample, (mu, logvar))
        eps_samples = _eps((2, 3, 4)).requires_grad_()
        assert torch.autograd.gradgradcheck(
            lambda m, v, e: fastvae.reparameterize_kl(m, v, e, samples=2), (mu, logvar, eps_samples)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_through_the_loss_matches_plain_pytorch(backend):
    """A gradient penalty, ||d loss / d x||^2, differentiated again into the weights W that
    make the logits: the second-order terms of the fused loss must be there."""
    torch.manual_seed(0)
    weights = torch.randn(5, 7, **F64) * 0.4
    h, target = torch.randn(6, 5, **F64), torch.rand(6, 7, **F64).round()
    mu, logvar = torch.randn(6, 3, **F64), torch.randn(6, 3, **F64)

    def penalty_grad(loss_fn):
        w = weights.clone().requires_grad_()
        m, v = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        loss = loss_fn(h @ w, m, v, target)
        g_w, g_m, g_v = torch.autograd.grad(loss, (w, m, v), create_graph=True)
        penalty = g_w.pow(2).sum() + g_m.pow(2).sum() + (g_v * v).sum()
        return torch.autograd.grad(penalty, (w, m, v))

    expected = penalty_grad(plain_elbo)
    with fastvae.use_backend(backend):
        fused = penalty_grad(fused_elbo)
        penalty_module = penalty_grad(lambda l, m, v, t: fastvae.ELBOLoss(beta=0.7)(l, t, m, v))
    for name, got, module_got, want in zip(("W", "mu", "logvar"), fused, penalty_module, expected):
        torch.testing.assert_close(
            got, want, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"d penalty/d {name}: {m}"
        )
        torch.testing.assert_close(module_got, want, rtol=1e-9, atol=1e-12)


def _transforms(fused, plain, inputs):
    """(name, fused result, plain result) for every torch.func transform and forward-mode AD."""
    tangents = tuple(torch.randn_like(t) for t in inputs)
    argnums = tuple(range(len(inputs)))
    out = [("grad", torch.func.grad(fused, argnums)(*inputs), torch.func.grad(plain, argnums)(*inputs))]
    value, vjp_fn = torch.func.vjp(fused, *inputs)
    plain_value, plain_vjp_fn = torch.func.vjp(plain, *inputs)
    out.append(("vjp", (value, vjp_fn(torch.ones_like(value))), (plain_value, plain_vjp_fn(torch.ones_like(value)))))
    out.append(("jvp", torch.func.jvp(fused, inputs, tangents), torch.func.jvp(plain, inputs, tangents)))
    out.append(("jacrev", torch.func.jacrev(fused, argnums)(*inputs), torch.func.jacrev(plain, argnums)(*inputs)))
    out.append(("jacfwd", torch.func.jacfwd(fused, argnums)(*inputs), torch.func.jacfwd(plain, argnums)(*inputs)))
    out.append(("hessian", torch.func.hessian(fused, 0)(*inputs), torch.func.hessian(plain, 0)(*inputs)))
    batched = tuple(torch.stack([t, t * 0.5]) for t in inputs)
    out.append(("vmap", torch.func.vmap(fused)(*batched), torch.func.vmap(plain)(*batched)))
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(t, d) for t, d in zip(inputs, tangents)]
        fused_tangent = forward_ad.unpack_dual(fused(*duals)).tangent
        plain_tangent = forward_ad.unpack_dual(plain(*duals)).tangent
    out.append(("forward_ad", fused_tangent, plain_tangent))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_torch_func_transform_matches_plain_pytorch(backend):
    logits, mu, logvar, target = _elbo_inputs()
    eps = _eps((3, 4))
    logvar_d = torch.randn(7, **F64)
    eps, eps_samples = _eps((3, 4)), _eps((2, 3, 4))
    samples_logits, z = _iwae_inputs()
    cases = {
        "iwae_loss": (
            lambda lk, zk, m, v: fused_iwae(lk, zk, m, v, target),
            lambda lk, zk, m, v: plain_iwae(lk, zk, m, v, target),
            (samples_logits, z, mu, logvar),
        ),
        "elbo_loss": (
            lambda l, m, v: fused_elbo(l, m, v, target),
            lambda l, m, v: plain_elbo(l, m, v, target),
            (logits, mu, logvar),
        ),
        "bernoulli": (
            lambda l: fastvae.bernoulli_log_likelihood(l, target),
            lambda l: -F.binary_cross_entropy_with_logits(l, target, reduction="sum") / 3,
            (logits,),
        ),
        "gaussian_kl": (
            lambda m, v: fastvae.gaussian_kl(m, v, "sum"),
            lambda m, v: 0.5 * (m.pow(2) + v.exp() - v - 1).sum(),
            (mu, logvar),
        ),
        "reparameterize_kl": (lambda m, v: fused_sample(m, v, eps), lambda m, v: plain_sample(m, v, eps), (mu, logvar)),
        "continuous_bernoulli": (
            lambda l: fastvae.continuous_bernoulli_log_likelihood(l, target),
            lambda l: plain_continuous_bernoulli(l, target).sum() / 3,
            (logits,),
        ),
        "gaussian_log_likelihood": (
            lambda m, v: fastvae.gaussian_log_likelihood(m, target, v, reduction="mean"),
            lambda m, v: plain_gaussian(m, target, v).mean(),
            (logits, logvar_d),
        ),
        "elbo_loss_continuous_bernoulli": (
            lambda l, m, v: fused_elbo_with("continuous_bernoulli")(l, m, v, target),
            lambda l, m, v: plain_elbo_with(plain_continuous_bernoulli)(l, m, v, target),
            (logits, mu, logvar),
        ),
        "elbo_loss_gaussian": (
            lambda l, m, v, d: fused_elbo_with("gaussian")(l, m, v, target, d),
            lambda l, m, v, d: plain_elbo_with(plain_gaussian)(l, m, v, target, d),
            (logits, mu, logvar, logvar_d),
        ),
        "reparameterize_kl_samples": (
            lambda m, v: fused_samples(m, v, eps_samples),
            lambda m, v: plain_sample(m, v, eps_samples),
            (mu, logvar),
        ),  # broadcast
    }
    with fastvae.use_backend(backend):
        for op, (fused, plain, inputs) in cases.items():
            for name, got, want in _transforms(fused, plain, inputs):
                torch.testing.assert_close(
                    got, want, rtol=1e-9, atol=1e-12, msg=lambda m, op=op, name=name: f"{op} {name}: {m}"
                )


@pytest.mark.parametrize("backend", BACKENDS)
def test_dreg_refuses_double_backward_and_transforms(backend):
    """DReG is an estimator of first-order gradients, not the derivative of a function: a double
    backward or a torch.func transform through it is refused with the way out, not computed wrong."""
    _, mu, logvar, target = _elbo_inputs()
    samples_logits, z = (t.requires_grad_() for t in _iwae_inputs())
    mu.requires_grad_()
    with fastvae.use_backend(backend):
        loss = fused_iwae(samples_logits, z * 1, mu, logvar, target, "dreg")
        with pytest.raises(RuntimeError, match="first-order gradients.*estimator='iwae'"):
            torch.autograd.grad(loss, (samples_logits, z, mu), create_graph=True)
        with pytest.raises(RuntimeError, match="first-order gradients.*estimator='iwae'"):
            torch.func.grad(lambda zk: fused_iwae(samples_logits, zk, mu, logvar, target, "dreg"))(z.detach())


def test_the_noise_under_vmap_follows_torch_randomness_modes():
    """Drawn noise under vmap: torch's own rule applies (an error unless randomness= says how)."""
    mu = torch.zeros(2, 3, 4)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(fastvae.reparameterize)(mu, mu)
    same = torch.func.vmap(fastvae.reparameterize, randomness="same")(mu, mu)
    different = torch.func.vmap(fastvae.reparameterize, randomness="different")(mu, mu)
    assert torch.equal(same[0], same[1]) and not torch.equal(different[0], different[1])
