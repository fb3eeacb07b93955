"""fastvae.evaluate against a case computed by hand: a 1-D latent with a linear Bernoulli decoder.

For p(z) = N(0, 1) and p(x_d = 1 | z) = sigmoid(w_d z + b_d), the marginal
log p(x) = log ∫ N(z; 0, 1) prod_d Bern(x_d; sigmoid(w_d z + b_d)) dz is a 1-D
integral that quadrature on a fine grid gives to ~1e-10; the importance-sampled
estimate must converge to it, and the one-sample ELBO must average to
E_q[log p(x|z)] - KL(q || p), also computed by quadrature.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastvae
from benchmarks.eval_ab import unfused_iw_log_likelihood
from fastvae.train.data import Split
from fastvae.train.evaluate import evaluate_elbo, evaluate_nll, iw_log_likelihood

PIXELS = 6
GRID = torch.linspace(-10.0, 10.0, 4001, dtype=torch.float64)  # N(0,1) and q have no mass beyond +-10


class LinearLatent(nn.Module):
    """logits = w z + b; q(z|x) is the Gaussian with the exact posterior's mean and
    VAR_INFLATION times its variance (wider than the posterior, as importance
    sampling wants), so the IW estimate converges quickly yet the ELBO gap stays > 0."""

    VAR_INFLATION = 1.5
    likelihood = "bernoulli"  # what fastvae's losses take, as on models.VAE

    def decoder_log_variance(self) -> None:  # a Bernoulli has none
        return None

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(1.5 * torch.randn(PIXELS, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.5 * torch.randn(PIXELS, generator=g, dtype=torch.float64))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior moments by quadrature -> mu, logvar [B, 1]."""
        log_post = log_lik_on_grid(self, x) - 0.5 * GRID**2
        post = torch.softmax(log_post, dim=1)  # [B, G]
        mean = (post * GRID).sum(1, keepdim=True)
        var = (post * (GRID - mean) ** 2).sum(1, keepdim=True)
        return mean, torch.log(self.VAR_INFLATION * var)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # z [..., 1] -> [..., 1, 1, D]: leading dims kept, as models.VAE.decode keeps K samples' [K, B].
        return (z * self.w + self.b).reshape(*z.shape[:-1], 1, 1, PIXELS)


def log_lik_on_grid(model: LinearLatent, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) [B, G] for every grid point z."""
    logits = GRID[None, :, None] * model.w + model.b  # [1, G, D]
    target = x.flatten(1)[:, None, :]
    return (target * logits - nn.functional.softplus(logits)).sum(-1).detach()


def exact_log_marginal(model: LinearLatent, x: torch.Tensor) -> torch.Tensor:
    """log p(x) [B] by trapezoid quadrature in log space."""
    log_prior = -0.5 * (GRID**2 + math.log(2 * math.pi))
    step = GRID[1] - GRID[0]
    return torch.logsumexp(log_lik_on_grid(model, x) + log_prior, dim=1) + torch.log(step)


def exact_elbo(model: LinearLatent, x: torch.Tensor) -> torch.Tensor:
    """E_q[log p(x|z)] - KL(q || N(0,1)) [B], the expectation by quadrature against q."""
    mu, logvar = (t.detach() for t in model.encode(x))
    var = logvar.exp()
    log_q = -0.5 * ((GRID - mu) ** 2 / var + logvar + math.log(2 * math.pi))  # [B, G]
    weights = log_q.exp() * (GRID[1] - GRID[0])
    expected_log_lik = (weights * log_lik_on_grid(model, x)).sum(1)
    kl = 0.5 * (mu**2 + var - logvar - 1).squeeze(1)
    return expected_log_lik - kl


def binary_data(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 1, PIXELS, generator=g) < 0.5).double()


@pytest.fixture(autouse=True)
def reference_backend():
    with fastvae.use_backend("torch"):
        yield


def test_quadrature_is_normalized():
    """Sanity of the oracle: p(x) over all 2^D binary images sums to 1."""
    model = LinearLatent()
    codes = torch.arange(2**PIXELS)
    every_x = ((codes[:, None] >> torch.arange(PIXELS)) & 1).double().reshape(-1, 1, 1, PIXELS)
    total = torch.logsumexp(exact_log_marginal(model, every_x), 0)
    assert abs(total.item()) < 1e-8


@pytest.mark.parametrize("estimator", [iw_log_likelihood, unfused_iw_log_likelihood], ids=["fused", "unfused"])
@pytest.mark.parametrize("iw_batch_size", [37, 100000], ids=["many-chunks", "one-chunk"])
def test_iw_estimate_matches_quadrature(iw_batch_size, estimator):
    """fastvae-eval's estimator, and the unfused one benchmarks/eval_ab.py times it against."""
    model = LinearLatent()
    x = binary_data(8)
    estimate = estimator(model, x, 5000, iw_batch_size, torch.Generator().manual_seed(0))
    assert estimate.dtype == torch.float64 and estimate.shape == (8,)
    torch.testing.assert_close(estimate, exact_log_marginal(model, x), atol=0.02, rtol=0)


def test_one_sample_iw_is_below_the_marginal_on_average():
    """K=1 is the ELBO, which is below log p(x) by KL(q || posterior) > 0 (Jensen)."""
    model = LinearLatent()
    unique = binary_data(4)
    one = iw_log_likelihood(model, unique.repeat(500, 1, 1, 1), 1, 4096, torch.Generator().manual_seed(0))
    gap = exact_log_marginal(model, unique) - exact_elbo(model, unique)
    assert (gap > 1e-3).all()
    five_sigma = 5 * one.std().item() / math.sqrt(len(one))
    torch.testing.assert_close(one.mean(), exact_elbo(model, unique).mean(), atol=five_sigma, rtol=0)


def test_evaluate_elbo_matches_quadrature():
    model = LinearLatent()
    unique = binary_data(4)
    x = unique.repeat(1000, 1, 1, 1)
    split = Split(x, torch.zeros(len(x), dtype=torch.int64))
    result = evaluate_elbo(model, split, 500, torch.device("cpu"), seed=0)
    expected = -exact_elbo(model, unique).mean().item()
    assert result["neg_elbo"] == pytest.approx(result["recon"] + result["kl"])
    mu, logvar = model.encode(unique)
    kl = 0.5 * (mu**2 + logvar.exp() - logvar - 1).mean().item()
    assert result["kl"] == pytest.approx(kl, rel=1e-5)
    # One noise draw per datapoint: 4000 draws put the mean within ~0.1 nats; 0.3 is 5 sigma here.
    assert result["neg_elbo"] == pytest.approx(expected, abs=0.3)


def test_evaluate_nll_mean_and_standard_error():
    model = LinearLatent()
    x = binary_data(30)
    split = Split(x, torch.zeros(len(x), dtype=torch.int64))
    result = evaluate_nll(model, split, 3000, 2048, 7, torch.device("cpu"), seed=0)
    exact = -exact_log_marginal(model, x)
    assert result["nll"] == pytest.approx(exact.mean().item(), abs=0.02)
    assert result["nll_stderr"] == pytest.approx((exact.std() / math.sqrt(len(x))).item(), rel=0.02)
    assert result["examples"] == 30 and result["iw_samples"] == 3000


def test_iw_samples_must_be_positive():
    with pytest.raises(ValueError, match="^samples must be >= 1, got 0"):
        iw_log_likelihood(LinearLatent(), binary_data(2), 0, 10, torch.Generator())


# --------------------------------------------------------------------------- the fused estimator, sample by sample
class RecordSamples:
    """Wraps fastvae.reparameterize and keeps every z it returns, so that a test can redo the estimate on
    exactly the noise the estimator drew."""

    def __init__(self, monkeypatch) -> None:
        self.drawn: list[torch.Tensor] = []
        real = fastvae.reparameterize

        def recording(*args, **kwargs):
            z = real(*args, **kwargs)
            self.drawn.append(z)
            return z

        monkeypatch.setattr(fastvae, "reparameterize", recording)


def direct_log_weights(model, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x) [K, B] in float64, written out with no fastvae op."""
    k, batch = z.shape[:2]
    decoded = model.decode(z.flatten(0, 1)).double().reshape(k, batch, -1)
    mu, logvar = (t.double() for t in model.encode(x))
    z = z.double()
    target = x.double().reshape(1, batch, -1)
    if model.likelihood == "gaussian":
        logvar_x = model.decoder_logvar.double().reshape(1, 1, -1)
        log_lik = -0.5 * ((target - decoded) ** 2 / logvar_x.exp() + logvar_x + math.log(2 * math.pi))
    else:
        log_lik = target * decoded - nn.functional.softplus(decoded)
        if model.likelihood == "continuous_bernoulli":
            l = decoded
            small = l.abs() < 1e-3
            # log C(l) = log(l / tanh(l / 2)); its series log 2 + l^2 / 12 near 0.
            log_c = torch.where(
                small,
                math.log(2) + l**2 / 12,
                torch.log(torch.where(small, 1.0, l) / torch.tanh(torch.where(small, 1.0, l) / 2)),
            )
            log_lik = log_lik + log_c
    log_prior = -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)
    log_q = -0.5 * ((z - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)
    return log_lik.sum(-1) + log_prior - log_q


@pytest.mark.parametrize("iw_batch_size", [9, 1000], ids=["chunks-of-3", "one-chunk"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
def test_fused_estimate_is_the_float64_estimate_on_the_same_samples(monkeypatch, likelihood, iw_batch_size):
    """The fused bound of each chunk, combined across chunks, equals log (1/K) sum_k w_k computed directly in
    float64 on the very samples z_k the estimator drew (float32 model: agreement to float32 rounding)."""
    from fastvae.train.models import VAEConfig, build_model

    torch.manual_seed(0)
    model = build_model(VAEConfig(image_shape=(1, 4, 4), latent_dim=3, hidden_dims=(12,), likelihood=likelihood))
    if model.decoder_logvar is not None:
        with torch.no_grad():
            model.decoder_logvar.uniform_(-1.0, 0.5)
    x = torch.rand(3, 1, 4, 4)
    if likelihood == "bernoulli":
        x = x.round()
    recorder = RecordSamples(monkeypatch)
    estimate = iw_log_likelihood(model, x, 10, iw_batch_size, torch.Generator().manual_seed(5))
    z = torch.cat(recorder.drawn)  # [K, B, L], the chunks in order
    assert z.shape == (10, 3, 3) and len(recorder.drawn) == (4 if iw_batch_size == 9 else 1)
    with torch.no_grad():
        direct = torch.logsumexp(direct_log_weights(model, x, z), dim=0) - math.log(10)
    assert estimate.dtype == torch.float64
    torch.testing.assert_close(estimate, direct, rtol=1e-5, atol=1e-4)
