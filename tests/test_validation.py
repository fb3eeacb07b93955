"""Every mistake a caller can make gets an error that names the argument and says how to fix it."""

from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae.ops.elbo_spec import elbo_from
from fastvae.ops.gaussian_likelihood.spec import oracle_log_prob as oracle_gaussian

B, D, L = 4, 10, 3


def _args(**override):
    args = {
        "logits": torch.randn(B, D),
        "target": torch.rand(B, D),
        "mu": torch.randn(B, L),
        "logvar": torch.randn(B, L),
    }
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, error, message",
    [
        (
            {"target": torch.rand(B, D - 1)},
            ValueError,
            r"logits \[4, 10\] and target \[4, 9\] must have the same shape",
        ),
        ({"logvar": torch.randn(B, L + 1)}, ValueError, r"mu \[4, 3\] and logvar \[4, 4\] must have the same shape"),
        ({"mu": torch.randn(B + 1, L), "logvar": torch.randn(B + 1, L)}, ValueError, "same batch size"),
        ({"target": torch.ones(B, D, dtype=torch.long)}, TypeError, r"target must be a floating-point tensor.*int64"),
        ({"logits": torch.ones(B, D, dtype=torch.bool)}, TypeError, "logits must be a floating-point tensor"),
        ({"mu": [[0.0] * L] * B}, TypeError, "mu must be a torch.Tensor, got list"),
        ({"logits": torch.tensor(1.0), "target": torch.tensor(1.0)}, ValueError, "batch dimension"),
        ({"target": torch.rand(B, D, device="meta")}, ValueError, "one device.*logits on cpu, target on meta"),
    ],
)
def test_elbo_loss_rejects_bad_inputs(override, error, message):
    with pytest.raises(error, match=message):
        fastvae.elbo_loss(**_args(**override))


def test_elbo_loss_takes_either_mu_and_logvar_or_kl():
    args = _args()
    kl = torch.rand(B)
    with pytest.raises(TypeError, match="pass mu and logvar, or kl="):
        fastvae.elbo_loss(args["logits"], args["target"])
    with pytest.raises(TypeError, match="not both: the KL would count twice"):
        fastvae.elbo_loss(**args, kl=kl)
    with pytest.raises(ValueError, match=r"kl must be the per-datapoint KL \[B\] = \[4\].*got \[4, 3\]"):
        fastvae.elbo_loss(args["logits"], args["target"], kl=torch.rand(B, L))
    with pytest.raises(TypeError, match="kl must be a floating-point tensor"):
        fastvae.elbo_loss(args["logits"], args["target"], kl=torch.ones(B, dtype=torch.long))


def test_unknown_reduction_and_negative_beta():
    with pytest.raises(ValueError, match=r"unknown reduction 'avg'.*'batchmean'"):
        fastvae.gaussian_kl(torch.randn(2, 3), torch.randn(2, 3), reduction="avg")
    with pytest.raises(ValueError, match="unknown reduction"):
        fastvae.ELBOLoss(reduction="elementwise")
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        fastvae.elbo_loss(**_args(), beta=-1.0)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        fastvae.ELBOLoss(beta=-0.5)


def test_reparameterize_rejects_bad_inputs():
    mu, logvar = torch.randn(B, L), torch.randn(B, L)
    with pytest.raises(ValueError, match=r"eps \[4, 2\] and mu \[4, 3\] must have the same shape"):
        fastvae.reparameterize(mu, logvar, torch.randn(B, 2))
    with pytest.raises(TypeError, match="eps must be a floating-point tensor"):
        fastvae.reparameterize_kl(mu, logvar, torch.zeros(B, L, dtype=torch.int32))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fastvae.reparameterize(mu, logvar, generator=42)
    with pytest.raises(TypeError, match="logvar must be a floating-point tensor"):
        fastvae.reparameterize(mu, logvar.long())


@pytest.mark.parametrize(
    "samples, error, message",
    [
        (0, ValueError, "samples must be >= 1, got 0"),
        (-3, ValueError, "samples must be >= 1, got -3"),
        (2.0, TypeError, "samples must be an int >= 1.*got float"),
        (True, TypeError, "samples must be an int >= 1.*got bool"),
    ],
)
def test_reparameterize_samples_is_a_positive_int(samples, error, message):
    with pytest.raises(error, match=message):
        fastvae.reparameterize(torch.randn(B, L), torch.randn(B, L), samples=samples)


def test_reparameterize_eps_has_the_samples_dim():
    mu, logvar = torch.randn(B, L), torch.randn(B, L)
    with pytest.raises(ValueError, match=r"eps \[4, 3\] must have shape \[samples, \*mu.shape\] = \[2, 4, 3\]"):
        fastvae.reparameterize(mu, logvar, torch.randn(B, L), samples=2)
    with pytest.raises(ValueError, match=r"eps \[3, 4, 3\] must have shape.*\[2, 4, 3\] with samples=2"):
        fastvae.reparameterize_kl(mu, logvar, torch.randn(3, B, L), samples=2)


K = 5


def _iwae_args(**override):
    args = {
        "logits": torch.randn(K, B, D),
        "x": torch.rand(B, D),
        "z": torch.randn(K, B, L),
        "mu": torch.randn(B, L),
        "logvar": torch.randn(B, L),
    }
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, error, message",
    [
        (
            {"z": torch.randn(K + 1, B, L)},
            ValueError,
            r"z \[6, 4, 3\] and logits \[5, 4, 10\] must have the same number of samples K \(dim 0\)",
        ),
        (
            {"z": torch.randn(K, B + 1, L)},
            ValueError,
            r"z \[5, 5, 3\] and logits \[5, 4, 10\] must have the same batch size B \(dim 1\)",
        ),
        ({"x": torch.rand(B + 1, D)}, ValueError, r"x \[5, 10\] must have the shape \[4, 10\].*batch size B"),
        ({"x": torch.rand(B, D - 1)}, ValueError, r"x \[4, 9\] must have the shape \[4, 10\].*data shape D"),
        ({"x": torch.rand(K, B, D)}, ValueError, r"x \[5, 4, 10\] must have the shape \[4, 10\]"),
        (
            {"mu": torch.randn(B, L + 1), "logvar": torch.randn(B, L + 1)},
            ValueError,
            r"mu \[4, 4\] must have the shape \[4, 3\] of one sample of z.*latent shape L",
        ),
        ({"mu": torch.randn(B - 1, L), "logvar": torch.randn(B - 1, L)}, ValueError, r"mu \[3, 3\].*batch size B"),
        ({"logvar": torch.randn(B, L + 1)}, ValueError, r"logvar \[4, 4\] and mu \[4, 3\] must have the same shape"),
        ({"logits": torch.randn(B, D), "x": torch.rand(D)}, ValueError, r"z \[5, 4, 3\] and logits \[4, 10\]"),
        ({"logits": torch.randn(D)}, ValueError, r"logits must be \[K, B, \.\.\.\].*samples=K.*got shape \[10\]"),
        ({"logits": torch.randn(0, B, D), "z": torch.randn(0, B, L)}, ValueError, "no sample.*K >= 1"),
        ({"x": torch.ones(B, D, dtype=torch.long)}, TypeError, r"x must be a floating-point tensor.*int64"),
        ({"z": [[0.0]]}, TypeError, "z must be a torch.Tensor, got list"),
        (
            {"mu": torch.randn(B, L, device="meta"), "logvar": torch.randn(B, L, device="meta")},
            ValueError,
            "one device.*logits on cpu.*mu on meta",
        ),
    ],
)
def test_iwae_loss_rejects_bad_inputs(override, error, message):
    with pytest.raises(error, match=message):
        fastvae.iwae_loss(**_iwae_args(**override))


def test_iwae_loss_names_its_choices():
    args = _iwae_args()
    with pytest.raises(ValueError, match=r"unknown likelihood 'normal'; choose one of 'bernoulli'"):
        fastvae.iwae_loss(**args, likelihood="normal")
    with pytest.raises(ValueError, match=r"unknown estimator 'reinforce'; choose one of 'iwae', 'dreg'"):
        fastvae.iwae_loss(**args, estimator="reinforce")
    with pytest.raises(ValueError, match=r"unknown reduction 'avg'"):
        fastvae.iwae_loss(**args, reduction="avg")
    with pytest.raises(ValueError, match="unknown estimator"):
        fastvae.IWAELoss(estimator="dReG")


@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan")], ids=["above", "below", "nan"])
def test_iwae_loss_refuses_data_outside_the_unit_interval(bad):
    args = _iwae_args()
    args["x"][2, 7] = bad
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\].*x\[2, 7\]"):
        fastvae.iwae_loss(**args)
    fastvae.set_validate_args(False)
    try:
        rows = fastvae.iwae_loss(**args, reduction="none")
    finally:
        fastvae.set_validate_args(True)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()


def test_unknown_backend_names():
    with (
        pytest.raises(ValueError, match="unknown fastvae backend 'cuda'.*auto, triton, native, torch"),
        fastvae.use_backend("cuda"),
    ):
        pass


def test_bad_environment_backend(monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", "fast")
    fastvae.backend.read_environment()
    with pytest.raises(ValueError, match="FASTVAE_BACKEND='fast' is not a fastvae backend"):
        fastvae.gaussian_kl(torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.parametrize(
    "beta, error, message",
    [
        (float("nan"), ValueError, r"finite number >= 0.*nan"),
        (float("inf"), ValueError, r"finite number >= 0.*inf"),
        (torch.tensor(-0.5), ValueError, r"finite number >= 0.*-0.5"),
        (torch.tensor(float("nan")), ValueError, r"finite number >= 0.*nan"),
        (torch.ones(B), ValueError, r"beta must be a scalar.*shape \[4\]"),
        (torch.ones(1), ValueError, r"beta must be a scalar.*shape \[1\]"),
        (torch.tensor(1), TypeError, "floating-point tensor"),
        (True, TypeError, "float or a 0-d tensor"),
        ("0.5", TypeError, "float or a 0-d tensor"),
    ],
    ids=["nan", "inf", "tensor-negative", "tensor-nan", "per-datapoint", "one-element", "int-tensor", "bool", "str"],
)
def test_beta_is_a_finite_non_negative_scalar(beta, error, message):
    with pytest.raises(error, match=message):
        fastvae.elbo_loss(**_args(), beta=beta)


def test_a_scalar_tensor_beta_weights_the_kl():
    args = _args()
    as_float = fastvae.elbo_loss(**args, beta=0.3, reduction="none")
    as_tensor = fastvae.elbo_loss(**args, beta=torch.tensor(0.3), reduction="none")
    torch.testing.assert_close(as_tensor, as_float)
    assert as_tensor.shape == (B,)


@pytest.mark.parametrize("bad", [2.0, -0.25, float("nan")], ids=["above", "below", "nan"])
def test_targets_outside_the_unit_interval_are_refused_with_the_fix(bad):
    args = _args()
    args["target"][1, 3] = bad
    for call in (
        lambda: fastvae.elbo_loss(**args),
        lambda: fastvae.bernoulli_log_likelihood(args["logits"], args["target"]),
        lambda: fastvae.bernoulli_log_likelihood(args["logits"], args["target"], reduction="none"),
    ):
        with pytest.raises(ValueError, match=r"target must lie in \[0, 1\].*target\[1, 3\].*x / 255"):
            call()


def test_with_validation_off_a_bad_target_gives_nan_not_a_number():
    args = _args()
    args["target"][2, 0] = 2.0  # x * l - softplus(l) would be a positive "log-likelihood" here
    fastvae.set_validate_args(False)
    try:
        rows = fastvae.bernoulli_log_likelihood(args["logits"], args["target"], reduction="none")
        loss = fastvae.elbo_loss(**args, reduction="none")
    finally:
        fastvae.set_validate_args(True)
    assert torch.isnan(rows[2, 0]) and torch.isfinite(rows[[0, 1, 3]]).all() and torch.isfinite(rows[2, 1:]).all()
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()


def test_nan_logits_are_not_blamed_on_the_targets():
    args = _args()
    args["logits"][0, 0] = float("nan")
    assert torch.isnan(fastvae.bernoulli_log_likelihood(args["logits"], args["target"]))


def test_set_validate_args_takes_a_bool():
    with pytest.raises(TypeError, match="True or False"):
        fastvae.set_validate_args("no")


# --------------------------------------------------------------------------- the likelihood families
@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: fastvae.continuous_bernoulli_log_likelihood(torch.randn(B, D), torch.rand(B, D + 1)),
            ValueError,
            r"logits \[4, 10\] and x \[4, 11\] must have the same shape",
        ),
        (
            lambda: fastvae.continuous_bernoulli_log_likelihood(torch.randn(B, D), torch.ones(B, D, dtype=torch.uint8)),
            TypeError,
            "x must be a floating-point tensor",
        ),
        (
            lambda: fastvae.continuous_bernoulli_log_likelihood(torch.randn(B, D), torch.rand(B, D), reduction="avg"),
            ValueError,
            "unknown reduction 'avg'",
        ),
        (
            lambda: fastvae.gaussian_log_likelihood(torch.randn(B, D), torch.randn(B + 1, D)),
            ValueError,
            r"mean \[4, 10\] and x \[5, 10\] must have the same shape",
        ),
        (
            lambda: fastvae.gaussian_log_likelihood(torch.randn(B, D), torch.randn(B, D), torch.randn(D + 1)),
            ValueError,
            r"logvar \[11\] must broadcast to the shape of x \[4, 10\].*per feature \(\[10\]\) or a scalar",
        ),
        (
            lambda: fastvae.gaussian_log_likelihood(torch.randn(B, D), torch.randn(B, D), torch.randn(2, D)),
            ValueError,
            r"logvar \[2, 10\] must broadcast to the shape of x \[4, 10\]",
        ),
        (
            lambda: fastvae.gaussian_log_likelihood(torch.randn(B, D), torch.randn(B, D), torch.randn(3, B, D)),
            ValueError,
            r"logvar \[3, 4, 10\] must broadcast to the shape of x \[4, 10\]",
        ),
        (
            lambda: fastvae.gaussian_log_likelihood(
                torch.randn(B, D), torch.randn(B, D), torch.zeros(D, dtype=torch.long)
            ),
            TypeError,
            "logvar must be a floating-point tensor",
        ),
        (
            lambda: fastvae.gaussian_log_likelihood(torch.randn(B, D), torch.randn(B, D), [0.0] * D),
            TypeError,
            "logvar must be a torch.Tensor, got list",
        ),
        (
            lambda: fastvae.gaussian_log_likelihood(
                torch.randn(B, D), torch.randn(B, D), torch.randn(D, device="meta")
            ),
            ValueError,
            "one device.*x on cpu, logvar on meta",
        ),
    ],
    ids=[
        "cb-shapes",
        "cb-int-target",
        "cb-reduction",
        "gaussian-shapes",
        "logvar-width",
        "logvar-rows",
        "logvar-more-dims",
        "logvar-int",
        "logvar-list",
        "logvar-device",
    ],
)
def test_likelihoods_reject_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_log_variance_broadcasts_from_any_shared_shape():
    mean, x = torch.randn(B, 2, 5), torch.randn(B, 2, 5)
    for shape in [(), (5,), (2, 1), (1, 2, 5), (B, 1, 1), (B, 2, 5)]:
        logvar = torch.randn(shape)
        expected = torch.distributions.Normal(mean.double(), torch.exp(0.5 * logvar.double())).log_prob(x.double())
        got = fastvae.gaussian_log_likelihood(mean, x, logvar, reduction="none")
        torch.testing.assert_close(
            got.double(), expected, rtol=2e-6, atol=1e-6, msg=lambda m, shape=shape: f"{shape}: {m}"
        )


@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")], ids=["above", "below", "nan"])
def test_continuous_bernoulli_refuses_data_outside_the_unit_interval(bad):
    args = _args()
    args["target"][2, 7] = bad
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\].*x\[2, 7\]"):
        fastvae.continuous_bernoulli_log_likelihood(args["logits"], args["target"])
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\].*x\[2, 7\]"):
        fastvae.continuous_bernoulli_log_likelihood(args["logits"], args["target"], reduction="none")
    with pytest.raises(ValueError, match=r"target must lie in \[0, 1\].*target\[2, 7\]"):
        fastvae.elbo_loss(**args, likelihood="continuous_bernoulli")
    fastvae.set_validate_args(False)
    try:
        rows = fastvae.continuous_bernoulli_log_likelihood(args["logits"], args["target"], reduction="none")
    finally:
        fastvae.set_validate_args(True)
    assert torch.isnan(rows[2, 7]) and torch.isfinite(rows[[0, 1, 3]]).all()


def test_the_gaussian_takes_any_real_data():
    args = _args(target=torch.randn(B, D) * 100)
    decoder_logvar = torch.randn(B, D)
    loss = fastvae.elbo_loss(**args, likelihood="gaussian", decoder_logvar=decoder_logvar, beta=0.7)
    logp = oracle_gaussian(args["logits"].double(), args["target"].double(), decoder_logvar.double())
    expected = elbo_from(logp, args["mu"].double(), args["logvar"].double(), beta=0.7)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0.0)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 1\]"):
        fastvae.elbo_loss(**args)  # the Bernoulli default still refuses it


def test_elbo_loss_refuses_an_unknown_likelihood_or_a_stray_log_variance():
    with pytest.raises(
        ValueError,
        match=r"unknown likelihood 'normal'; choose one of 'bernoulli', "
        r"'continuous_bernoulli', 'gaussian'",
    ):
        fastvae.elbo_loss(**_args(), likelihood="normal")
    with pytest.raises(ValueError, match="unknown likelihood"):
        fastvae.ELBOLoss(likelihood="laplace")
    with pytest.raises(
        ValueError,
        match=r"decoder_logvar is the log-variance of a Gaussian.*likelihood='bernoulli'.*"
        r"pass likelihood='gaussian'",
    ):
        fastvae.elbo_loss(**_args(), decoder_logvar=torch.randn(B, D))
    with pytest.raises(ValueError, match="likelihood='continuous_bernoulli'"):
        fastvae.ELBOLoss(likelihood="continuous_bernoulli")(**_args(), decoder_logvar=torch.randn(D))
    with pytest.raises(ValueError, match=r"decoder_logvar \[3\] must broadcast to the shape of target \[4, 10\]"):
        fastvae.elbo_loss(**_args(), likelihood="gaussian", decoder_logvar=torch.randn(3))
