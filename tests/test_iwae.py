"""iwae_loss beyond the oracle suite: DReG against a plain-PyTorch DReG written here, K = 1 against the
single-sample ELBO, the data read in place, a VAE's whole loss side with K samples, the saved
gradient's hand-over, the module and the likelihood table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae.ops.iwae import op as iwae_op
from fastvae.ops.likelihoods import LIKELIHOODS
from fastvae.ops.noise import draw_seed, philox_normal
from fastvae.ops.registry import family

from helpers import BACKENDS, DEVICE, assert_close_to, leaf

F64 = {"device": DEVICE, "dtype": torch.float64}


def _inputs(samples=4, batch=3, data=11, latent=5, dtype=torch.float64):
    """Fresh random logits [K, B, D], x [B, D], z [K, B, L], mu, logvar [B, L] (never zeros)."""
    generator = torch.Generator().manual_seed(samples * 100 + batch)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(DEVICE, dtype)

    x = torch.rand(batch, data, generator=generator, dtype=torch.float64).to(DEVICE, dtype)
    x[:, ::2] = x[:, ::2].round()
    return (
        randn(samples, batch, data, scale=2.0),
        x,
        randn(samples, batch, latent),
        randn(batch, latent),
        randn(batch, latent, scale=0.7),
    )


def _gaussian_log_density(z, mean, logvar):
    """log N(z; mean, exp(logvar)) summed over the last dim, written out."""
    return -0.5 * ((z - mean) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)


def _log_weights(logits, x, z, mu, logvar):
    """log w [K, B] = log p(x | logits) + log N(z; 0, I) - log N(z; mu, exp(logvar)) in plain PyTorch."""
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    zeros = torch.zeros_like(z)
    return log_px + _gaussian_log_density(z, zeros, zeros) - _gaussian_log_density(z, mu, logvar)


def _plain_dreg_gradients(logits, x, z, mu, logvar, upstream):
    """DReG (Tucker et al., ICLR 2019) in the surrogate-loss form a user writes: the normalized
    weights detached; the encoder's surrogate -sum_k w~_k^2 log w_k with log q's parameters
    detached (no score function) and the decoder's output detached; the decoder's surrogate the
    IWAE one, -sum_k w~_k log p(x | l_k). Returns d/d(logits, z, mu, logvar) of upstream . rows."""
    logits, z, mu, logvar = (t.detach().requires_grad_() for t in (logits, z, mu, logvar))
    weights = torch.softmax(_log_weights(logits, x, z, mu, logvar), dim=0).detach()
    encoder = -(weights**2 * _log_weights(logits.detach(), x, z, mu.detach(), logvar.detach())).sum(0)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    decoder = -(weights * log_px).sum(0)
    grads = torch.autograd.grad(((encoder + decoder) * upstream).sum(), (logits, z), allow_unused=True)
    return grads[0], grads[1], torch.zeros_like(mu), torch.zeros_like(logvar)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dreg_gradients_match_a_plain_pytorch_dreg(backend):
    """estimator="dreg" against DReG's surrogate losses, per input, for an upstream gradient per row;
    the value is the IWAE bound's."""
    logits, x, z, mu, logvar = (leaf(t) if i != 1 else t for i, t in enumerate(_inputs()))
    upstream = torch.rand(3, **F64) + 0.5
    with fastvae.use_backend(backend):
        rows = fastvae.iwae_loss(logits, x, z, mu, logvar, estimator="dreg", reduction="none")
        grads = torch.autograd.grad(rows, (logits, z, mu, logvar), upstream)
        iwae_rows = fastvae.iwae_loss(logits, x, z, mu, logvar, reduction="none")
    expected_rows = math.log(4) - torch.logsumexp(_log_weights(logits, x, z, mu, logvar), dim=0)
    assert_close_to(rows, expected_rows, "rows")
    assert torch.equal(rows, iwae_rows), "DReG changes the gradients, not the value"
    for name, got, want in zip(
        ("logits", "z", "mu", "logvar"), grads, _plain_dreg_gradients(logits, x, z, mu, logvar, upstream)
    ):
        assert_close_to(got, want, f"grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dreg_through_an_encoder_and_a_decoder_is_tucker_et_al_exactly(backend):
    """A linear encoder and decoder around the loss, against DReG written as two surrogates: the
    encoder's gets w~^2 on every path into z, the decoder's included (its parameters detached
    there), and no score function; the decoder's parameters get the IWAE gradient (z detached)."""
    torch.manual_seed(3)
    samples, batch, data, latent = 5, 4, 9, 3
    x = torch.rand(batch, data, **F64).round()
    encoder_weights = leaf(0.3 * torch.randn(data, 2 * latent, **F64))
    decoder_weights = leaf(0.5 * torch.randn(latent, data, **F64))
    eps = torch.randn(samples, batch, latent, **F64)

    def posterior():
        mu, logvar = (x @ encoder_weights).chunk(2, dim=1)
        return mu, logvar, mu + torch.exp(0.5 * logvar) * eps

    with fastvae.use_backend(backend):
        mu, logvar, z = posterior()
        loss = fastvae.iwae_loss(z @ decoder_weights, x, z, mu, logvar, estimator="dreg")
        got = torch.autograd.grad(loss, (encoder_weights, decoder_weights))
    mu, logvar, z = posterior()
    weights = torch.softmax(_log_weights(z @ decoder_weights, x, z, mu, logvar), dim=0).detach()
    encoder_surrogate = (
        -(weights**2 * _log_weights(z @ decoder_weights.detach(), x, z, mu.detach(), logvar.detach())).sum(0).mean()
    )
    expected_encoder = torch.autograd.grad(encoder_surrogate, encoder_weights)[0]
    z_fixed = z.detach()
    iwae = (
        math.log(samples)
        - torch.logsumexp(_log_weights(z_fixed @ decoder_weights, x, z_fixed, mu.detach(), logvar.detach()), dim=0)
    ).mean()
    expected_decoder = torch.autograd.grad(iwae, decoder_weights)[0]
    assert_close_to(got[0], expected_encoder, "encoder (DReG)")
    assert_close_to(got[1], expected_decoder, "decoder (IWAE)")


def test_dreg_refuses_to_weight_one_z_twice():
    logits, x, z, mu, logvar = (leaf(t) if i != 1 else t for i, t in enumerate(_inputs()))
    fastvae.iwae_loss(logits, x, z, mu, logvar, estimator="dreg")
    with pytest.raises(ValueError, match="already applied to this z"):
        fastvae.iwae_loss(logits, x, z, mu, logvar, estimator="dreg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sample_is_the_single_sample_elbo(backend):
    """K = 1: the weight is 1, and the bound is -log p(x | z) - log N(z; 0, I) + log N(z; mu, exp(logvar)),
    the ELBO's Monte Carlo estimate on that z, value and gradients; the logits' gradient is
    elbo_loss's (the same likelihood term)."""
    logits, x, z, mu, logvar = (leaf(t) if i != 1 else t for i, t in enumerate(_inputs(samples=1)))
    with fastvae.use_backend(backend):
        loss = fastvae.iwae_loss(logits, x, z, mu, logvar)
        grads = torch.autograd.grad(loss, (logits, z, mu, logvar))
        elbo = fastvae.elbo_loss(logits[0], x, mu, logvar)
        (elbo_grad_logits,) = torch.autograd.grad(elbo, logits)
    zeros = torch.zeros_like(z[0])
    recon = F.binary_cross_entropy_with_logits(logits[0], x, reduction="none").sum(-1)
    single = (recon - _gaussian_log_density(z[0], zeros, zeros) + _gaussian_log_density(z[0], mu, logvar)).mean()
    expected = torch.autograd.grad(single, (logits, z, mu, logvar))
    assert_close_to(loss, single, "loss")
    for name, got, want in zip(("logits", "z", "mu", "logvar"), grads, expected):
        assert_close_to(got, want, f"grad_{name}")
    assert_close_to(grads[0], elbo_grad_logits, "grad_logits vs elbo_loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_data_is_read_in_place_for_every_sample(backend, monkeypatch):
    """The likelihood kernel gets x itself, [B, D], against logits [K * B, D]: no K-fold copy."""
    received = []
    real = iwae_op.implementation

    def recording(family_name, kernel, device):
        fn = real(family_name, kernel, device)
        if kernel != "bernoulli_forward":
            return fn

        def wrapper(logits, target, *args):
            received.append((tuple(logits.shape), tuple(target.shape), target.data_ptr()))
            return fn(logits, target, *args)

        return wrapper

    monkeypatch.setattr(iwae_op, "implementation", recording)
    logits, x, z, mu, logvar = (
        leaf(t) if i != 1 else t for i, t in enumerate(_inputs(samples=6, batch=4, dtype=torch.float32))
    )
    with fastvae.use_backend(backend):
        loss = fastvae.iwae_loss(logits, x, z, mu, logvar)
        loss.backward()
    assert received == [((24, 11), (4, 11), x.data_ptr())], received
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_loss_side_of_a_vae_with_k_samples(backend):
    """reparameterize(samples=K) then iwae_loss: the gradients reaching mu and logvar (through z and
    directly) against a float64 oracle on the same Philox noise."""
    samples, batch, data, latent = 5, 6, 13, 4
    _, x, _, mu, logvar = _inputs(samples, batch, data, latent, dtype=torch.float32)
    mu, logvar = leaf(mu), leaf(logvar)
    decoder = torch.randn(latent, data, device=DEVICE) * 0.5
    seed_generator = torch.Generator(DEVICE).manual_seed(5)
    with fastvae.use_backend(backend):
        z = fastvae.reparameterize(mu, logvar, samples=samples, generator=torch.Generator(DEVICE).manual_seed(5))
        loss = fastvae.iwae_loss(z @ decoder, x, z, mu, logvar)
        grads = torch.autograd.grad(loss, (mu, logvar))
    eps = philox_normal(draw_seed(DEVICE, seed_generator), (samples, batch, latent), torch.float64, DEVICE)
    mu64, logvar64 = leaf(mu.double()), leaf(logvar.double())
    z64 = mu64 + torch.exp(0.5 * logvar64) * eps
    oracle = (
        math.log(samples)
        - torch.logsumexp(_log_weights(z64 @ decoder.double(), x.double(), z64, mu64, logvar64), dim=0)
    ).mean()
    assert_close_to(loss, oracle, "loss")
    for name, got, want in zip(("mu", "logvar"), grads, torch.autograd.grad(oracle, (mu64, logvar64))):
        assert_close_to(got, want, f"grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_and_with_an_upstream_gradient(backend):
    """The first backward scales the forward's gradient in place and hands it over; a second one over
    the retained graph recomputes it (here after a hook zeroed the first in place), and an
    upstream gradient of 2.5 scales all of it."""
    logits, x, z, mu, logvar = (leaf(t.float()) if i != 1 else t.float() for i, t in enumerate(_inputs()))
    inputs = (logits, z, mu, logvar)
    with fastvae.use_backend(backend):
        loss = fastvae.iwae_loss(logits, x, z, mu, logvar)
        handle = logits.register_hook(lambda grad: grad.zero_())
        zeroed = torch.autograd.grad(loss, inputs, retain_graph=True)[0]
        handle.remove()
        second = torch.autograd.grad(loss, inputs, retain_graph=True)
        scaled = torch.autograd.grad(2.5 * loss, inputs)
    leaves64 = [leaf(t.double()) for t in inputs]
    oracle = (math.log(4) - torch.logsumexp(_log_weights(leaves64[0], x.double(), *leaves64[1:]), dim=0)).mean()
    expected = torch.autograd.grad(oracle, leaves64)
    assert not zeroed.any()
    for name, got, again, want in zip(("logits", "z", "mu", "logvar"), second, scaled, expected):
        assert_close_to(got, want, f"second backward, grad_{name}")
        assert_close_to(again, 2.5 * want, f"upstream 2.5, grad_{name}")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_the_module_is_the_function(reduction):
    logits, x, z, mu, logvar = _inputs(dtype=torch.float32)
    criterion = fastvae.IWAELoss(estimator="dreg", reduction=reduction)
    assert "estimator='dreg'" in repr(criterion)
    expected = fastvae.iwae_loss(logits, x, z, mu, logvar, estimator="dreg", reduction=reduction)
    assert torch.equal(criterion(logits, x, z, mu, logvar), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_gives_zeros_of_the_right_shape(backend):
    logits, x, z, mu, logvar = (leaf(t) if i != 1 else t for i, t in enumerate(_inputs(batch=0)))
    with fastvae.use_backend(backend):
        rows = fastvae.iwae_loss(logits, x, z, mu, logvar, reduction="none")
        mean = fastvae.iwae_loss(logits, x, z, mu, logvar)
        (rows.sum() + mean).backward()
    assert rows.shape == (0,) and mean.item() == 0.0
    assert logits.grad.shape == logits.shape and z.grad.shape == z.shape and mu.grad.shape == mu.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("samples, batch", [(1, 3), (3, 2), (3, 0)], ids=["K1", "K3", "empty"])
@pytest.mark.parametrize("layout", ["sample", "datapoint", "datapoint-with-samples-dim", "pixel"])
def test_the_decoder_log_variance_gradient_has_the_dtype_the_fake_promises(backend, samples, batch, layout):
    """opcheck on bf16 means and log-variances: the per-element dlogp/d(log-variance) is in the
    log-variance's dtype when it has the means' shape, else float32, for every K (with K = 1 a
    per-datapoint log-variance has as many rows as the means) and an empty batch."""
    logits, x, z, mu, logvar = _inputs(samples=samples, batch=batch, dtype=torch.float32)
    shape = {
        "sample": logits.shape,
        "datapoint": logits.shape[1:],
        "datapoint-with-samples-dim": (1, *logits.shape[1:]),
        "pixel": logits.shape[2:],
    }[layout]
    decoder_logvar = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.bfloat16)
    with fastvae.use_backend(backend):
        torch.library.opcheck(
            iwae_op.iwae_loss_op, (logits.bfloat16(), x, z, mu, logvar, decoder_logvar, "gaussian", "iwae", True)
        )


def test_every_likelihood_names_a_forward_kernel_of_its_family():
    """A LIKELIHOODS entry is a family and one of its registered kernels: the table is how elbo_loss
    and iwae_loss reach the likelihoods, so an entry that points nowhere must fail here, not in a
    user's run."""
    assert set(LIKELIHOODS) == {"bernoulli", "continuous_bernoulli", "gaussian"}
    for name, entry in LIKELIHOODS.items():
        assert entry.kernel in family(entry.family).kernels, f"likelihood {name}: {entry}"


def _gaussian_log_weights(mean, x, z, mu, logvar, decoder_logvar):
    """log w [K, B] with a Gaussian p(x|z) = N(x; mean, exp(decoder_logvar)), written out."""
    log_px = -0.5 * ((x - mean) ** 2 / decoder_logvar.exp() + decoder_logvar + math.log(2 * math.pi))
    zeros = torch.zeros_like(z)
    return (
        log_px.expand_as(mean).sum(-1) + _gaussian_log_density(z, zeros, zeros) - _gaussian_log_density(z, mu, logvar)
    )


# Every way a decoder's log-variance may broadcast to the means [K, B, D]: per sample, per sample but
# shared by the batch, per datapoint (with and without the samples dim), per feature, a scalar.
DECODER_LOGVAR_SHAPES = [(4, 3, 11), (4, 1, 11), (3, 11), (1, 3, 11), (11,), (1, 1, 11), ()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", DECODER_LOGVAR_SHAPES, ids=str)
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_the_gaussian_bound_with_every_shape_of_decoder_log_variance(backend, shape, estimator):
    """Values and every gradient against the bound written out in float64. A broadcast log-variance
    gets its gradient summed over the dims it was broadcast over, in its own shape. DReG changes
    only the encoder's side: the decoder's gradients (mean and log-variance) are the IWAE ones."""
    mean, x, z, mu, logvar = _inputs()
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    decoder_logvar = leaf(
        0.8 * torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    )
    mean, z, mu, logvar = leaf(mean), leaf(z), leaf(mu), leaf(logvar)
    upstream = torch.rand(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE) + 0.5
    with fastvae.use_backend(backend):
        rows = fastvae.iwae_loss(
            mean,
            x,
            z,
            mu,
            logvar,
            likelihood="gaussian",
            decoder_logvar=decoder_logvar,
            estimator=estimator,
            reduction="none",
        )
        grads = torch.autograd.grad((rows * upstream).sum(), (mean, decoder_logvar))
    log_w = _gaussian_log_weights(mean, x, z, mu, logvar, decoder_logvar)
    expected_rows = math.log(4) - torch.logsumexp(log_w, dim=0)
    expected = torch.autograd.grad((expected_rows * upstream).sum(), (mean, decoder_logvar))
    assert_close_to(rows, expected_rows, "rows")
    for name, got, want in zip(("mean", "decoder_logvar"), grads, expected):
        assert got.shape == want.shape, name
        assert_close_to(got, want, f"grad_{name}")


def test_a_decoder_log_variance_needs_the_gaussian_and_must_broadcast():
    mean, x, z, mu, logvar = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="likelihood='gaussian'"):
        fastvae.iwae_loss(mean, x, z, mu, logvar, decoder_logvar=torch.zeros(11))
    with pytest.raises(ValueError, match="decoder_logvar"):
        fastvae.iwae_loss(mean, x, z, mu, logvar, likelihood="gaussian", decoder_logvar=torch.zeros(5))
