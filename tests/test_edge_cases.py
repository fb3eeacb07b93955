"""Empty batches, strided and transposed inputs, extreme values, and proof that every output is written."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae
from fastvae.ops.bernoulli.op import bernoulli_log_likelihood_fused
from fastvae.ops.bernoulli.spec import oracle_log_prob as oracle_logp
from fastvae.ops.continuous_bernoulli.op import continuous_bernoulli_log_likelihood_fused
from fastvae.ops.continuous_bernoulli.spec import oracle_log_prob as oracle_cb
from fastvae.ops.gaussian.spec import oracle_kl
from fastvae.ops.gaussian_likelihood.spec import oracle_log_prob as oracle_gaussian
from fastvae.ops.registry import family

from helpers import BACKENDS, DEVICE, RecordPointwiseSizes, assert_close_to, leaf


def oracle_z(mu, logvar, eps):
    return mu.double() + torch.exp(0.5 * logvar.double()) * eps.double()


def rows_sum(t):
    return t.reshape(t.shape[0], -1).sum(dim=1)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_zeros_of_the_right_shape(backend, reduction):
    logits, target = leaf(torch.randn(0, 12, device=DEVICE)), torch.rand(0, 12, device=DEVICE)
    mu, logvar = leaf(torch.randn(0, 4, device=DEVICE)), leaf(torch.randn(0, 4, device=DEVICE))
    shared_logvar = leaf(torch.randn(12, device=DEVICE))
    with fastvae.use_backend(backend):
        z, kl = fastvae.reparameterize_kl(mu, logvar)
        loss = fastvae.elbo_loss(logits, target, mu, logvar, reduction=reduction)
        logp = fastvae.bernoulli_log_likelihood(logits, target, reduction=reduction)
        kl_none = fastvae.gaussian_kl(mu, logvar, reduction=reduction)
        cb = fastvae.continuous_bernoulli_log_likelihood(logits, target, reduction=reduction)
        gaussian = fastvae.gaussian_log_likelihood(logits, target, shared_logvar, reduction=reduction)
        gaussian_loss = fastvae.elbo_loss(
            logits, target, mu, logvar, reduction=reduction, likelihood="gaussian", decoder_logvar=shared_logvar
        )
        (
            loss.sum()
            + logp.sum()
            + kl_none.sum()
            + z.sum()
            + kl.sum()
            + cb.sum()
            + gaussian.sum()
            + gaussian_loss.sum()
        ).backward()
    assert z.shape == (0, 4) and kl.shape == (0,)
    if reduction == "none":
        assert loss.shape == (0,) and logp.shape == (0, 12) and kl_none.shape == (0, 4)
        assert cb.shape == (0, 12) and gaussian.shape == (0, 12) and gaussian_loss.shape == (0,)
    else:
        for value in (loss, logp, kl_none, cb, gaussian, gaussian_loss):
            assert value.shape == () and value.item() == 0.0
    assert logits.grad.shape == (0, 12) and mu.grad.shape == (0, 4)
    assert shared_logvar.grad.shape == (12,) and not shared_logvar.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_transposed_inputs(backend):
    """mu, logvar as halves of one encoder output (strided rows); logits transposed (copied)."""
    h = leaf(torch.randn(7, 2 * 13, device=DEVICE))
    mu, logvar = h.chunk(2, dim=1)
    logits_t = leaf(torch.randn(29, 7, device=DEVICE))
    logits = logits_t.t()
    target = torch.rand(29, 7, device=DEVICE).t()
    eps = torch.randn(13, 7, device=DEVICE).t()
    with fastvae.use_backend(backend):
        z, kl = fastvae.reparameterize_kl(mu, logvar, eps)
        loss = fastvae.elbo_loss(logits, target, mu, logvar, reduction="sum") + (z * 0.3).sum() + kl.sum()
        loss.backward()
    h64, logits64 = leaf(h.double()), leaf(logits_t.double())
    mu64, logvar64 = h64.chunk(2, dim=1)
    z64 = oracle_z(mu64, logvar64, eps)
    kl64 = rows_sum(oracle_kl(mu64, logvar64))
    loss64 = -oracle_logp(logits64.t(), target).sum() + kl64.sum() + (z64 * 0.3).sum() + kl64.sum()
    loss64.backward()
    assert_close_to(z, z64, "z")
    assert_close_to(loss, loss64, "loss")
    assert_close_to(h.grad, h64.grad, "grad_h")
    assert_close_to(logits_t.grad, logits64.grad, "grad_logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_inputs_stay_finite_and_exact(backend):
    logits = leaf(torch.tensor([[-100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0]] * 2, device=DEVICE))
    target = torch.tensor([[0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]], device=DEVICE)
    mu = leaf(torch.tensor([[-20.0, 0.0, 20.0, 1e-4], [3.0, -3.0, 0.0, 0.0]], device=DEVICE))
    logvar = leaf(torch.tensor([[-30.0, 30.0, 0.0, 1e-6], [30.0, -30.0, -1e-6, 10.0]], device=DEVICE))
    with fastvae.use_backend(backend):
        logp = fastvae.bernoulli_log_likelihood(logits, target, reduction="none")
        kl = fastvae.gaussian_kl(mu, logvar, reduction="none")
        z, kl_rows = fastvae.reparameterize_kl(mu, logvar)
        (logp.sum() + kl.sum() + z.sum() + kl_rows.sum()).backward()
    assert_close_to(logp, oracle_logp(logits.double(), target.double()), "logp")
    assert_close_to(kl, oracle_kl(mu.double(), logvar.double()), "kl")
    assert_close_to(kl_rows, rows_sum(oracle_kl(mu.double(), logvar.double())), "kl_rows")
    for name, t in {"z": z, "grad_logits": logits.grad, "grad_mu": mu.grad, "grad_logvar": logvar.grad}.items():
        assert torch.isfinite(t).all(), f"{name} is not finite"


# Logits where the continuous Bernoulli's closed form is 0/0 (0), its derivative cancels (near 0),
# the series meets the closed forms (1), and torch.distributions' clamped version drifts (30 to 88).
CB_EXTREME_LOGITS = [0.0, 1e-8, -1e-8, 1e-3, -1e-3, 0.1, -0.1, 1.0, -1.0, 30.0, -30.0, 88.0, -88.0, 100.0, -100.0]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def _per_column(actual, expected, name):
    """Each column checked on its own scale: a tiny log p beside a large one must be exact too."""
    for j in range(expected.shape[1]):
        assert_close_to(actual[:, j], expected[:, j], f"{name}[:, {j}]")


def _matches_oracle_per_column(logp, logits, target, oracle):
    """logp (computed from the leaf `logits`, already backpropagated with ones) and logits' gradient
    against the float64 oracle's, column by column."""
    logits64 = leaf(logits.detach().double())
    expected = oracle(logits64, target.double())
    expected.sum().backward()
    _per_column(logp, expected, "logp")
    _per_column(logits.grad, logits64.grad, "grad_logits")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_bernoulli_is_accurate_at_every_logit(backend, dtype):
    logits = leaf(torch.tensor([CB_EXTREME_LOGITS] * 4, device=DEVICE).to(dtype))
    target = torch.rand(4, len(CB_EXTREME_LOGITS), device=DEVICE)
    target[0], target[1] = 0.0, 1.0  # the support's ends, beside grey levels
    with fastvae.use_backend(backend):
        logp = fastvae.continuous_bernoulli_log_likelihood(logits, target, reduction="none")
        logp.backward(torch.ones_like(logp))
    _matches_oracle_per_column(logp, logits, target, oracle_cb)


# Logits where 1 + exp(-|l|) rounds to 1 in float32 (|l| > 17) or float64 (|l| > 37), where it just
# does not, and small ones: the softplus tail's two branches and their seam, and the kink at 0.
BERNOULLI_EXTREME_LOGITS = [-100.0, -40.0, -30.0, -17.5, -16.0, -1.0, -1e-3, 0.0]
BERNOULLI_EXTREME_LOGITS += [-v for v in BERNOULLI_EXTREME_LOGITS[:-1]]
COMPOSITE_CASES = {
    "bernoulli": (bernoulli_log_likelihood_fused, oracle_logp, BERNOULLI_EXTREME_LOGITS),
    "continuous_bernoulli": (continuous_bernoulli_log_likelihood_fused, oracle_cb, CB_EXTREME_LOGITS),
}


# Not the continuous Bernoulli in float64: its oracle adds two values near -log 2 and log 2, good to
# about 1e-16 absolute, which per element at l = 1e-8 (log p about 5e-9) is no float64 check.
@pytest.mark.parametrize(
    ("likelihood", "dtype"),
    [("bernoulli", torch.float32), ("bernoulli", torch.float64), ("continuous_bernoulli", torch.float32)],
    ids=str,
)
def test_composite_gradients_are_exact_at_extreme_logits(likelihood, dtype):
    """The composites that compiled CPU graphs inline and torch.func transforms differentiate: their
    values and autograd gradients must match the oracle element by element, at l = 0 (a kink of
    max(l, 0) and |l|, which autograd must resolve to the true slope) and where the softplus tail's
    correction or the continuous Bernoulli's series takes over."""
    fused, oracle, values = COMPOSITE_CASES[likelihood]
    logits = leaf(torch.tensor([values] * 4, dtype=dtype))
    target = torch.rand(4, len(values), dtype=dtype)
    target[0], target[1] = 0.0, 1.0  # binary data, beside grey levels
    logp, _ = fused.composite(logits, target, True, False)
    logp.backward(torch.ones_like(logp))
    _matches_oracle_per_column(logp, logits, target, oracle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_composite_keeps_tiny_gradients_of_well_predicted_binary_data(dtype):
    """A background pixel (x = 0) predicted with logit l << 0, or a foreground one (x = 1) with
    l >> 0, has dlogp/dl = -+sigmoid(-|l|), tiny but exact in floating point. The composite's
    autograd must not lose it to rounding beside a 1/2 or a 1 that cancels: each element is
    checked on its own scale."""
    magnitudes = torch.tensor([1.0, 5.0, 17.5, 30.0, 40.0, 60.0, 100.0], dtype=torch.float64)
    logits = leaf(torch.cat([-magnitudes, magnitudes]).to(dtype))
    target = torch.cat([torch.zeros_like(magnitudes), torch.ones_like(magnitudes)]).to(dtype)
    logp, _ = bernoulli_log_likelihood_fused.composite(logits[None], target[None], True, False)
    logp.sum().backward()
    expected = torch.cat([-torch.sigmoid(-magnitudes), torch.sigmoid(-magnitudes)])
    _per_column(logits.grad[None], expected[None], "grad_logits")


def test_composite_second_derivative_is_exact_at_the_kink():
    """torch.func differentiates the composite twice (Hessians, gradient penalties): at l = 0, where
    max(l, 0) and |l| have kinks, d2logp/dl2 must be -sigmoid'(0) = -1/4, and dlogp/dl x - 1/2."""
    target = torch.rand((), dtype=torch.float64)

    def logp(logit):
        return bernoulli_log_likelihood_fused.composite(logit[None, None], target[None, None], True, False)[0][0, 0]

    for zero in (0.0, -0.0):
        logit = torch.tensor(zero, dtype=torch.float64)
        assert_close_to(torch.func.grad(logp)(logit)[None], (target - 0.5)[None], "dlogp/dl at 0")
        quarter = torch.tensor([-0.25], dtype=torch.float64)
        assert_close_to(torch.func.hessian(logp)(logit)[None], quarter, "d2logp/dl2 at 0")


# (logvar, x - mean) pairs: log-variances of +-30, data far from the mean, and x == mean exactly.
# Float16 holds gradients up to 65504 only, so its extremes are milder.
GAUSSIAN_EXTREMES = {
    torch.float32: [
        (-30.0, 1e-3),
        (-30.0, 0.0),
        (30.0, 1e4),
        (30.0, 0.0),
        (0.0, 1e4),
        (0.0, -1e4),
        (12.5, 3e3),
        (-30.0, -2e-3),
    ],
    torch.float16: [(-10.0, 1e-2), (-10.0, 0.0), (10.0, 3e2), (10.0, 0.0), (0.0, 2e2), (0.0, -2e2)],
}
GAUSSIAN_EXTREMES[torch.bfloat16] = GAUSSIAN_EXTREMES[torch.float32]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_is_accurate_at_extreme_log_variances_and_distances(backend, dtype):
    logvar_values, distances = zip(*GAUSSIAN_EXTREMES[dtype])
    mean = leaf(torch.randn(3, len(distances), device=DEVICE).to(dtype))
    logvar = leaf(torch.tensor([logvar_values] * 3, device=DEVICE).to(dtype))
    x = (mean.detach().double() + torch.tensor(distances, dtype=torch.float64, device=DEVICE)).float()
    with fastvae.use_backend(backend):
        logp = fastvae.gaussian_log_likelihood(mean, x, logvar, reduction="none")
        logp.backward(torch.ones_like(logp))
    mean64, logvar64 = leaf(mean.detach().double()), leaf(logvar.detach().double())
    expected = oracle_gaussian(mean64, x.double(), logvar64)
    expected.sum().backward()
    _per_column(logp, expected, "logp")
    _per_column(mean.grad, mean64.grad, "grad_mean")
    _per_column(logvar.grad, logvar64.grad, "grad_logvar")


@pytest.mark.parametrize("backend", BACKENDS)
def test_iwae_loss_with_extreme_inputs(backend):
    """Saturated logits (log p of -100 for a sample: a normalized weight of 0), a posterior far from
    the prior and log-variances of +-30, with z drawn from q as a sampler would: the bound and
    every gradient match the float64 oracle and stay finite."""
    from fastvae.ops.iwae.spec import oracle_iwae_rows

    logits = leaf(torch.tensor([[[-100.0, 100.0, 30.0, -1e-3]] * 2, [[0.0, -30.0, 100.0, 1e-3]] * 2], device=DEVICE))
    x = torch.tensor([[0.0, 1.0, 1.0, 0.5], [1.0, 0.0, 0.0, 1.0]], device=DEVICE)
    mu = leaf(torch.tensor([[19.0, 0.0], [0.0, 1e-4]], device=DEVICE))
    logvar = leaf(torch.tensor([[1e-6, -30.0], [30.0, 2.0]], device=DEVICE))
    eps = torch.tensor([[[1.5, -0.5], [0.1, 2.0]], [[-1.0, 0.5], [0.0, -3.0]]], device=DEVICE)
    z = leaf(mu.detach() + torch.exp(0.5 * logvar.detach()) * eps)
    inputs = (logits, z, mu, logvar)
    with fastvae.use_backend(backend):
        rows = fastvae.iwae_loss(logits, x, z, mu, logvar, reduction="none")
        grads = torch.autograd.grad(rows.sum(), inputs)
    leaves64 = [leaf(t.detach().double()) for t in inputs]
    expected = oracle_iwae_rows(leaves64[0], x.double(), *leaves64[1:])
    assert_close_to(rows, expected, "rows")
    for name, got, want in zip(("logits", "z", "mu", "logvar"), grads, torch.autograd.grad(expected.sum(), leaves64)):
        assert torch.isfinite(got).all(), f"grad_{name} is not finite"
        assert_close_to(got, want, f"grad_{name}")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Make every torch.empty / empty_like float output start as NaN, so an unwritten element shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (37, 1100)], ids=["1x1", "5x37", "37x1100"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(backend, shape, poisoned_outputs):
    gaussian, bernoulli = family("gaussian").module(backend), family("bernoulli").module(backend)
    cb, likelihood = family("continuous_bernoulli").module(backend), family("gaussian_likelihood").module(backend)
    a = torch.randn(shape, device=DEVICE)
    b = torch.rand(shape, device=DEVICE)
    seed = torch.tensor(1234, device=DEVICE)
    one_row = b[:1]  # a row-periodic target or log-variance
    iwae = family("iwae").module(backend)
    a = torch.randn(shape, device=DEVICE)
    b = torch.rand(shape, device=DEVICE)
    seed = torch.tensor(1234, device=DEVICE)
    samples = torch.randn((3 * shape[0], shape[1]), device=DEVICE)
    weights = torch.softmax(torch.randn(3, shape[0], device=DEVICE), dim=0)
    outputs = [
        *iwae.iwae_forward(torch.randn(3, shape[0], device=DEVICE), samples, a, b),
        *iwae.iwae_backward(b[:, 0].contiguous(), weights, samples, a, b, False),
        *iwae.iwae_backward(b[:, 0].contiguous(), weights, samples, a, b, True),
        *gaussian.reparameterize_kl_forward(a, b, None, seed),
        *gaussian.reparameterize_kl_backward(a, b[:, 0].contiguous(), a, b, None, seed),
        *gaussian.gaussian_kl_forward(a, b, True, True),
        *gaussian.gaussian_kl_forward(a, b, False, True),
        *bernoulli.bernoulli_forward(a, b, True, True),
        *bernoulli.bernoulli_forward(a, b, False, True),
        *cb.continuous_bernoulli_forward(a, b, True, True),
        *cb.continuous_bernoulli_forward(a, one_row, False, True),
        *likelihood.gaussian_likelihood_forward(a, b, b, True, True),
        *likelihood.gaussian_likelihood_forward(a, one_row, one_row, False, True),
        *likelihood.gaussian_likelihood_forward(a, b, None, True, True)[:2],
    ]
    assert torch.isnan(torch.empty(3)).all(), "the poison fixture is not active"
    for i, out in enumerate(outputs):
        assert not torch.isnan(out).any(), f"output {i} has unwritten (NaN) elements"


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_periodic_target_scores_logits_row_r_against_target_row_r_mod_t(backend, logits_dtype):
    """The Bernoulli kernel with a target of fewer rows T (dividing the logits' rows): row r is
    scored against target row r % T, read in place (strided rows here), for rows and elements,
    with the gradient, against the float64 oracle on the target repeated."""
    periods, rows, cols = 3, 5, 37
    bernoulli = family("bernoulli").module(backend)
    logits = (3 * torch.randn(periods * rows, cols, device=DEVICE)).to(logits_dtype)
    wide = torch.rand(rows, cols + 6, device=DEVICE)
    wide[:, ::3] = wide[:, ::3].round()
    target = wide[:, 2 : 2 + cols]  # strided rows, as a slice of wider data
    repeated = target.double().repeat(periods, 1)
    logits64 = logits.double().requires_grad_()
    expected = oracle_logp(logits64, repeated)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits64)
    for elementwise in (False, True):
        logp, grad = bernoulli.bernoulli_forward(logits, target, elementwise, True, 0.5)
        assert_close_to(logp, expected if elementwise else expected.sum(1), f"logp (elementwise={elementwise})")
        assert grad.dtype == logits_dtype
        assert_close_to(grad, 0.5 * expected_grad, f"grad (elementwise={elementwise})")


class _RecordOps(TorchDispatchMode):
    """The names of the aten ops dispatched while active (the autograd engine's included)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_fills_no_zero_gradients_for_the_saved_gradient_outputs(backend):
    """The ops return their forward-pass gradients as extra outputs that nothing differentiates;
    autograd must not build a zero-filled [B, D] gradient for them on every backward (it did,
    and that was most of the backward's time at batch 4096 x 784)."""
    logits, target = leaf(torch.randn(6, 11, device=DEVICE)), torch.rand(6, 11, device=DEVICE)
    mu, logvar = leaf(torch.randn(6, 3, device=DEVICE)), leaf(torch.randn(6, 3, device=DEVICE))
    with fastvae.use_backend(backend):
        loss = fastvae.elbo_loss(logits, target, mu, logvar) + fastvae.gaussian_kl(mu, logvar, "sum")
        with _RecordOps() as recorded:
            loss.backward()
    assert logits.grad is not None and mu.grad is not None and logvar.grad is not None
    filled = [name for name in recorded.names if name.split(".")[0] in ("zeros", "zeros_like", "zero_", "fill_")]
    assert filled == [], f"backward filled tensors with zeros: {filled}"


def _elbo_case(batch=6, data=11, latent=3):
    """A decoder-like graph: logits are a non-leaf (as in a VAE), so nothing clones their gradient."""
    weights = leaf(torch.randn(data, data, device=DEVICE) * 0.3)
    h, target = torch.randn(batch, data, device=DEVICE), torch.rand(batch, data, device=DEVICE)
    mu, logvar = leaf(torch.randn(batch, latent, device=DEVICE)), leaf(torch.randn(batch, latent, device=DEVICE))
    return weights, h, target, mu, logvar


def _oracle_elbo_grads(weights, h, target, mu, logvar):
    """d(mean -ELBO)/d(weights, mu) in float64."""
    w, m = leaf(weights.double()), leaf(mu.double())
    logits = h.double() @ w
    loss = (-rows_sum(oracle_logp(logits, target)) + rows_sum(oracle_kl(m, logvar))).mean()
    return torch.autograd.grad(loss, (w, m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_elbo_loss_backward_hands_over_the_forward_gradient(backend):
    """elbo_loss's Bernoulli kernel writes d(loss)/d(logits) with the reduction's weight; with the
    upstream gradient 1 on the CPU, backward must return it without another [B, D] pass, and the
    result must still match the float64 oracle."""
    weights, h, target, mu, logvar = _elbo_case()
    with fastvae.use_backend(backend):
        loss = fastvae.elbo_loss(h @ weights, target, mu, logvar)
        with RecordPointwiseSizes() as recorder:
            grad_w, grad_mu = torch.autograd.grad(loss, (weights, mu))
        sizes = recorder.sizes
    expected_w, expected_mu = _oracle_elbo_grads(weights, h, target, mu, logvar)
    assert_close_to(grad_w, expected_w, "grad_weights")
    assert_close_to(grad_mu, expected_mu, "grad_mu")
    assert sizes, "the recorder saw no pointwise op at all (the KL gradients are scaled by one)"
    if DEVICE.type == "cpu":
        assert h.numel() not in sizes, "backward ran a pointwise op over [B, D] (scaling the saved gradient)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_elbo_loss_backward_with_an_upstream_gradient_other_than_one_and_twice(backend):
    """Upstream 2.5 scales the handed-over gradient; retain_graph's second backward recomputes it
    (the first receiver may have changed it) and gives the same answer."""
    weights, h, target, mu, logvar = _elbo_case()
    expected = _oracle_elbo_grads(weights, h, target, mu, logvar)[0]
    with fastvae.use_backend(backend):
        loss = fastvae.elbo_loss(h @ weights, target, mu, logvar)
        first = torch.autograd.grad(loss, weights, retain_graph=True)[0]
        second = torch.autograd.grad(loss, weights, retain_graph=True)[0]
        scaled = torch.autograd.grad(2.5 * loss, weights)[0]
    assert_close_to(first, expected, "first backward")
    assert torch.equal(first, second), "a second backward over the same graph differs from the first"
    assert_close_to(scaled, 2.5 * expected, "upstream 2.5")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_handed_over_gradient_changed_by_its_receiver_is_not_reused(backend):
    """The gradient handed over in backward is the receiver's to change: here a hook zeroes it
    in place during the first backward. A second backward over the retained graph must
    recompute it, not hand over the zeroed tensor again."""
    logits = torch.randn(5, 23, device=DEVICE, requires_grad=True)
    target = torch.rand(5, 23, device=DEVICE).round()
    kl = torch.rand(5, device=DEVICE)
    with fastvae.use_backend(backend):
        loss = fastvae.elbo_loss(logits, target, kl=kl)
        handle = logits.register_hook(lambda grad: grad.zero_())
        (zeroed,) = torch.autograd.grad(loss, logits, retain_graph=True)
        handle.remove()
        (second,) = torch.autograd.grad(loss, logits)
    assert not zeroed.any()
    logits64 = logits.detach().double().requires_grad_()
    (-rows_sum(oracle_logp(logits64, target)) + kl.double()).mean().backward()
    assert_close_to(second, logits64.grad, "second backward")


def test_a_weighted_bernoulli_op_is_not_elementwise():
    logits, target = torch.randn(2, 3), torch.rand(2, 3)
    with pytest.raises(ValueError, match="elementwise must be False"):
        bernoulli_log_likelihood_fused(logits, target, True, False, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_stated_input_ranges_hold_per_dtype(backend):
    """The README's ranges: logits within ±100 and logvar within [-30, 30] give finite, exact
    results in float32 and bfloat16; in float16, whose largest value is 65504, logvar within
    [-30, 11] does (exp(logvar) / 2, the KL's gradient, passes 65504 at logvar 11.8), and z
    needs exp(logvar / 2) * |eps| below 65504."""
    for dtype, logvar_max in ((torch.float32, 30.0), (torch.bfloat16, 30.0), (torch.float16, 11.0)):
        logvar = leaf(torch.linspace(-30.0, logvar_max, 64, device=DEVICE).reshape(4, 16).to(dtype))
        mu = leaf(torch.randn(4, 16, device=DEVICE).to(dtype))
        logits = leaf(torch.linspace(-100.0, 100.0, 4 * 40, device=DEVICE).reshape(4, 40).to(dtype))
        target = torch.rand(4, 40, device=DEVICE).round()
        with fastvae.use_backend(backend):
            kl = fastvae.gaussian_kl(mu, logvar, reduction="sum")
            logp = fastvae.bernoulli_log_likelihood(logits, target, reduction="sum")
            (kl - logp).backward()
        expected_kl = oracle_kl(mu.double(), logvar.double()).sum()
        assert_close_to(kl, expected_kl, f"{dtype} kl")
        assert_close_to(logvar.grad, 0.5 * torch.expm1(logvar.double()), f"{dtype} grad_logvar")
        assert_close_to(logits.grad, torch.sigmoid(logits.double()) - target.double(), f"{dtype} grad_logits")
    # Past the float16 range the result is the rounding of a value float16 cannot hold: inf, not NaN.
    logvar = leaf(torch.full((1, 4), 12.0, device=DEVICE, dtype=torch.float16))
    with fastvae.use_backend(backend):
        fastvae.gaussian_kl(torch.zeros_like(logvar), logvar, reduction="sum").backward()
    assert torch.isinf(logvar.grad).all() and (logvar.grad > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_near_logvar_zero_keeps_its_digits(backend):
    """0.5 * (exp(logvar) - 1 - logvar) is about logvar^2 / 4 near 0: written with exp(logvar) - 1
    it loses every digit in float32; every backend uses expm1."""
    logvar = torch.tensor([[1e-4, -1e-4, 3e-3, -2e-3]], device=DEVICE)
    mu = torch.zeros_like(logvar)
    with fastvae.use_backend(backend):
        kl = fastvae.gaussian_kl(mu, logvar, reduction="none")
    expected = 0.5 * (torch.expm1(logvar.double()) - logvar.double())
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=0)
