"""fastvae.models: shapes from the config, validation, and the fused forward."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastvae
from fastvae.train.models import ARCHS, VAEConfig, build_model, parse_widths

SHAPES = [(1, 28, 28), (1, 12, 12), (3, 8, 16)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_follow_the_config(arch, shape):
    config = VAEConfig(arch=arch, image_shape=shape, latent_dim=5, hidden_dims=(24, 16), conv_channels=(4, 8))
    model = build_model(config)
    x = torch.rand(3, *shape)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 5)
    assert model.decode(mu).shape == (3, *shape)
    logits, mu2, _, kl = model(x)
    assert logits.shape == (3, *shape) and kl.shape == (3,) and kl.dtype == torch.float32
    assert torch.allclose(mu2, mu)


def test_forward_kl_is_the_closed_form_and_gradients_reach_the_encoder():
    torch.manual_seed(0)
    model = build_model(VAEConfig(image_shape=(1, 8, 8), latent_dim=4, hidden_dims=(16,)))
    x = torch.rand(6, 1, 8, 8)
    with fastvae.use_backend("torch"):
        logits, mu, logvar, kl = model(x)
    expected = 0.5 * (mu.double() ** 2 + logvar.double().exp() - logvar.double() - 1).sum(1)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)
    (kl.sum() - fastvae.bernoulli_log_likelihood(logits, x)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_sample_is_in_unit_interval_and_seeded():
    model = build_model(VAEConfig(image_shape=(1, 8, 8), latent_dim=3, hidden_dims=(8,)))
    a = model.sample(4, torch.Generator().manual_seed(1))
    b = model.sample(4, torch.Generator().manual_seed(1))
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_config_survives_json():
    config = VAEConfig(arch="conv", image_shape=(1, 28, 28), latent_dim=2)
    again = VAEConfig(**json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arch": "resnet"}, "unknown architecture 'resnet'"),
        ({"latent_dim": 0}, "latent_dim must be >= 1"),
        ({"hidden_dims": (0,)}, "widths must be >= 1"),
        ({"arch": "conv", "image_shape": (1, 10, 10)}, "divisible by 4"),
        ({"image_shape": (28, 28)}, r"\(C, H, W\)"),
        (
            {"likelihood": "continuous-bernoulli"},
            "unknown likelihood 'continuous-bernoulli'; choose one of bernoulli, continuous_bernoulli, gaussian",
        ),
    ],
    ids=["arch", "latent", "width", "conv-divisible", "shape", "likelihood"],
)
def test_bad_configs_say_how_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig(**kwargs)


def test_parse_widths():
    assert parse_widths("512, 256", "--hidden-dims") == (512, 256)
    for bad in ("", "a,b", "3,-1"):
        with pytest.raises(ValueError, match="--hidden-dims"):
            parse_widths(bad, "--hidden-dims")


# --------------------------------------------------------------------------- likelihoods
def _cb_mean_float64(logits: torch.Tensor) -> torch.Tensor:
    """1 / (1 - exp(-l)) - 1 / l in float64: at |l| >= 1e-6 its cancellation costs ~1e-16 / 1e-6 = 1e-10."""
    l = logits.double()
    return -1 / torch.expm1(-l) - 1 / l


def test_continuous_bernoulli_mean_matches_float64_from_tiny_to_huge_logits():
    model = build_model(VAEConfig(image_shape=(1, 4, 4), hidden_dims=(8,), likelihood="continuous_bernoulli"))
    g = torch.Generator().manual_seed(3)
    sign = torch.randint(0, 2, (4000,), generator=g) * 2 - 1
    magnitude = 10 ** torch.empty(4000).uniform_(-6, math.log10(80), generator=g)  # 1e-6 to 80, log-uniform
    logits = (sign * magnitude).float()
    got = model.likelihood_mean(logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _cb_mean_float64(logits), rtol=0, atol=1e-6)
    # l = 0 exactly is the limit 1/2; the mean rises with l from 0 (l -> -inf) to 1 (l -> +inf).
    edges = model.likelihood_mean(torch.tensor([0.0, -1e4, 1e4, -200.0]))
    torch.testing.assert_close(edges, torch.tensor([0.5, 1e-4, 1 - 1e-4, 0.005]))
    ordered = model.likelihood_mean(logits.sort().values)
    assert (ordered.diff() >= 0).all()


@pytest.mark.parametrize(
    "likelihood, expected",
    [
        ("bernoulli", torch.sigmoid),
        ("gaussian", lambda out: out),  # the mean itself, outside [0, 1] too; pictures clip it
    ],
)
def test_likelihood_mean_of_the_other_likelihoods(likelihood, expected):
    model = build_model(VAEConfig(image_shape=(1, 4, 4), hidden_dims=(8,), likelihood=likelihood))
    out = torch.linspace(-3, 3, 16).reshape(1, 1, 4, 4).to(torch.bfloat16)
    torch.testing.assert_close(model.likelihood_mean(out), expected(out.float()))


def test_only_the_gaussian_decoder_owns_a_log_variance():
    gaussian = build_model(VAEConfig(image_shape=(3, 8, 8), hidden_dims=(8,), likelihood="gaussian"))
    assert gaussian.decoder_logvar.shape == (3, 8, 8) and not gaussian.decoder_logvar.any()
    assert "decoder_logvar" in dict(gaussian.named_parameters())
    for likelihood in ("bernoulli", "continuous_bernoulli"):
        model = build_model(VAEConfig(image_shape=(3, 8, 8), hidden_dims=(8,), likelihood=likelihood))
        assert model.decoder_logvar is None and "decoder_logvar" not in model.state_dict()


@pytest.mark.parametrize("likelihood", ["continuous_bernoulli", "gaussian"])
def test_samples_are_the_likelihood_mean(likelihood):
    model = build_model(VAEConfig(image_shape=(1, 8, 8), latent_dim=3, hidden_dims=(8,), likelihood=likelihood))
    drawn = model.sample(4, torch.Generator().manual_seed(1))
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(drawn, model.likelihood_mean(model.decode(z)))


def test_the_learned_gaussian_variance_stops_at_the_8_bit_rounding_variance():
    """A pixel that never changes would send its variance to 0 and its density to infinity; the
    model floors the log-variance at log((1/255)^2 / 12), above it the parameter is used as is,
    and the floor passes no gradient down (the parameter stays where it is)."""
    from fastvae.train.models import MIN_DECODER_LOGVAR

    model = build_model(VAEConfig(image_shape=(1, 4, 4), latent_dim=2, hidden_dims=(8,), likelihood="gaussian"))
    values = torch.randn(1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).float() * 3 - 12
    values[0, 0, 0] = -40.0  # far below the floor
    with torch.no_grad():
        model.decoder_logvar.copy_(values)
    mean, x = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    logp = model.log_likelihood(mean, x, reduction="sum")
    floored = values.double().clamp_min(math.log((1 / 255) ** 2 / 12))
    expected = torch.distributions.Normal(mean.double(), torch.exp(0.5 * floored)).log_prob(x.double()).sum()
    torch.testing.assert_close(logp.double(), expected, rtol=1e-5, atol=1e-3)
    assert pytest.approx(math.log((1 / 255) ** 2 / 12)) == MIN_DECODER_LOGVAR
    logp.backward()
    assert model.decoder_logvar.grad[0, 0, 0] == 0
    above = values > MIN_DECODER_LOGVAR
    assert above.sum() > 0 and (model.decoder_logvar.grad[above] != 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_takes_samples_per_image(arch):
    """z [K, B, L] decodes to [K, B, C, H, W], each sample as the decoder gives it alone."""
    model = build_model(
        VAEConfig(arch=arch, image_shape=(1, 8, 8), latent_dim=3, hidden_dims=(16,), conv_channels=(4,))
    )
    z = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(6))
    decoded = model.decode(z)
    assert decoded.shape == (4, 5, 1, 8, 8)
    for k in range(4):
        torch.testing.assert_close(decoded[k], model.decode(z[k]), rtol=1e-5, atol=1e-6)
