"""The continuous Bernoulli and Gaussian likelihood families beyond the op suite (test_ops.py runs their
specs on every backend, dtype, shape and reduction): row-periodic targets at the kernel level,
the storage dtype pairs, log-variance shapes and their gradients' dtype, strided decoder
outputs, and elbo_loss's hand-over of their gradients (thread-count independence is in
test_native.py). Everything against a float64 oracle on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae.ops.continuous_bernoulli.spec import oracle_log_prob as oracle_cb
from fastvae.ops.gaussian.spec import oracle_kl
from fastvae.ops.gaussian_likelihood.spec import oracle_log_prob as oracle_gaussian
from fastvae.ops.registry import family

from helpers import BACKENDS, DEVICE, RecordPointwiseSizes, assert_close_to, leaf

SAMPLES, BATCH, DATA = 3, 4, 37  # K samples' decoder outputs [K * B, D] against data [B, D]
WEIGHT = -0.37  # what a loss weights the rows' sum by: the kernels write weight * dlogp


def _kernel(family_name: str, backend: str):
    name = {
        "continuous_bernoulli": "continuous_bernoulli_forward",
        "gaussian_likelihood": "gaussian_likelihood_forward",
    }[family_name]
    return getattr(family(family_name).module(backend), name)


def _oracle_rows_and_grads(log_prob, inputs, elementwise):
    """The oracle's log p ([N, D] or [N]) and weight * dlogp/d(each input), from float64 leaves."""
    leaves = [leaf(t.double()) for t in inputs]
    logp = log_prob(*leaves)
    grads = torch.autograd.grad(logp.sum() * WEIGHT, leaves)
    return (logp if elementwise else logp.sum(dim=1)), grads


@pytest.mark.parametrize("elementwise", [False, True], ids=["rows", "elementwise"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_bernoulli_scores_a_row_periodic_target(backend, elementwise):
    """logits [K * B, D] against a target [B, D]: row r is scored against target row r % B, as
    against the target repeated K times."""
    logits = 3 * torch.randn(SAMPLES * BATCH, DATA, device=DEVICE)
    target = torch.rand(BATCH, DATA, device=DEVICE)
    logp, grad = _kernel("continuous_bernoulli", backend)(logits, target, elementwise, True, WEIGHT)
    expected, (expected_grad, _) = _oracle_rows_and_grads(oracle_cb, (logits, target.repeat(SAMPLES, 1)), elementwise)
    assert_close_to(logp, expected, "logp")
    assert_close_to(grad, expected_grad, "grad_logits")


@pytest.mark.parametrize("logvar_rows", [BATCH, 1], ids=["logvar-per-datapoint", "logvar-shared"])
@pytest.mark.parametrize("elementwise", [False, True], ids=["rows", "elementwise"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_scores_a_row_periodic_target_and_logvar(backend, elementwise, logvar_rows):
    """mean [K * B, D] against x [B, D] and a log-variance of B rows or one: mean row r reads row
    r % B of x and r % R of the log-variance; the kernel's dlogp/dlogvar is per element [K * B, D]."""
    mean = torch.randn(SAMPLES * BATCH, DATA, device=DEVICE)
    x = 1.5 * torch.randn(BATCH, DATA, device=DEVICE)
    logvar = torch.randn(logvar_rows, DATA, device=DEVICE)
    logp, dmean, dlogvar = _kernel("gaussian_likelihood", backend)(mean, x, logvar, elementwise, True, WEIGHT)
    rows = SAMPLES * BATCH
    expanded = (mean, x.repeat(SAMPLES, 1), logvar.repeat(rows // logvar_rows, 1))
    expected, (expected_dmean, _, expected_dlogvar) = _oracle_rows_and_grads(oracle_gaussian, expanded, elementwise)
    assert_close_to(logp, expected, "logp")
    assert_close_to(dmean, expected_dmean, "grad_mean")
    assert_close_to(dlogvar, expected_dlogvar, "grad_logvar")


def _likelihood_calls(backend, first, second):
    """Each family's kernel on params of dtype `first` and a target of dtype `second`, with its
    float64 oracle: [(name, outputs, expected outputs)]."""
    logits = (3 * torch.randn(5, 67, device=DEVICE)).to(first)
    unit = torch.rand(5, 67, device=DEVICE).to(second)
    mean, logvar = torch.randn(5, 67, device=DEVICE).to(first), torch.randn(5, 67, device=DEVICE).to(first)
    x = torch.randn(5, 67, device=DEVICE).to(second)
    cb = _kernel("continuous_bernoulli", backend)(logits, unit, False, True, WEIGHT)
    gaussian = _kernel("gaussian_likelihood", backend)(mean, x, logvar, False, True, WEIGHT)
    cb_rows, cb_grads = _oracle_rows_and_grads(oracle_cb, (logits, unit), False)
    g_rows, (g_dmean, _, g_dlogvar) = _oracle_rows_and_grads(oracle_gaussian, (mean, x, logvar), False)
    return [("continuous_bernoulli", cb, (cb_rows, cb_grads[0])), ("gaussian", gaussian, (g_rows, g_dmean, g_dlogvar))]


PAIRS = [
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.float64),
]


@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_pair_of_storage_dtypes_is_read(backend, first, second):
    """The kernels read the pairs of common.LIKELIHOOD_DTYPE_PAIRS as they are and convert the
    others; log p comes back in the compute dtype, each gradient in its input's dtype."""
    compute = torch.float64 if torch.float64 in (first, second) else torch.float32
    for name, outputs, expected in _likelihood_calls(backend, first, second):
        assert outputs[0].dtype == compute, f"{name}: log p is {outputs[0].dtype}"
        for i, (out, want) in enumerate(zip(outputs, expected)):
            if i:
                assert out.dtype == first, f"{name}: gradient {i} is {out.dtype}, not the param's {first}"
            assert_close_to(out, want, f"{name} output {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shared_log_variance_gradient_sums_unrounded_values(backend):
    """A per-feature float16 log-variance under "mean": each element's share of its gradient is
    about 1e-7, below float16's normal range, so the kernel writes it in float32 and the sum
    over the batch is rounded to float16 once."""
    mean, x = leaf(torch.randn(64, 512, device=DEVICE).half()), torch.randn(64, 512, device=DEVICE)
    logvar = leaf(torch.randn(512, device=DEVICE).half())
    kernel_logvar_grad = _kernel("gaussian_likelihood", backend)(
        mean.detach(), x, logvar.detach().reshape(1, -1), False, True, 1e-5
    )[2]
    assert kernel_logvar_grad.dtype == torch.float32
    with fastvae.use_backend(backend):
        fastvae.gaussian_log_likelihood(mean, x, logvar, reduction="mean").backward()
    mean64, logvar64 = leaf(mean.detach().double()), leaf(logvar.detach().double())
    oracle_gaussian(mean64, x.double(), logvar64).mean().backward()
    assert logvar.grad.dtype == torch.float16
    assert_close_to(logvar.grad, logvar64.grad, "grad_logvar")
    assert_close_to(mean.grad, mean64.grad, "grad_mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_input_gives_nan_where_the_oracle_has_it(backend):
    """A NaN logit, mean, datum or log-variance makes its own element NaN (value and gradient) and
    its row's sum NaN, and nothing else: no select may turn it into a plausible number."""
    logits, unit = 3 * torch.randn(3, 9, device=DEVICE), torch.rand(3, 9, device=DEVICE)
    mean, x, logvar = (torch.randn(3, 9, device=DEVICE) for _ in range(3))
    logits[0, 4] = mean[1, 2] = x[2, 7] = logvar[0, 0] = float("nan")
    cb = _kernel("continuous_bernoulli", backend)(logits, unit, True, True, WEIGHT)
    gaussian = _kernel("gaussian_likelihood", backend)(mean, x, logvar, True, True, WEIGHT)
    cb_expected, (cb_grad, _) = _oracle_rows_and_grads(oracle_cb, (logits, unit), True)
    g_expected, (g_dmean, _, g_dlogvar) = _oracle_rows_and_grads(oracle_gaussian, (mean, x, logvar), True)
    for name, got, want in zip(
        ("cb logp", "cb grad", "gaussian logp", "grad_mean", "grad_logvar"),
        (*cb, *gaussian),
        (cb_expected, cb_grad, g_expected, g_dmean, g_dlogvar),
    ):
        assert_close_to(got, want, name)
    rows = _kernel("gaussian_likelihood", backend)(mean, x, logvar, False, False, WEIGHT)[0]
    assert torch.isnan(rows).all(), "each row holds a NaN element, so each row's sum is NaN"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_of_strided_decoder_halves(backend):
    """mean, logvar = decoder(z).chunk(2, dim=1): strided rows, read without a copy."""
    h = leaf(torch.randn(6, 2 * 29, device=DEVICE))
    mean, logvar = h.chunk(2, dim=1)
    x = torch.randn(6, 29, device=DEVICE)
    with fastvae.use_backend(backend):
        fastvae.gaussian_log_likelihood(mean, x, logvar, reduction="sum").backward()
    h64 = leaf(h.detach().double())
    oracle_gaussian(*h64.chunk(2, dim=1)[:1], x.double(), h64.chunk(2, dim=1)[1]).sum().backward()
    assert_close_to(h.grad, h64.grad, "grad_h")


# --------------------------------------------------------------------------- elbo_loss
def _decoder_case(likelihood):
    """A decoder-like graph (logits or mean = h @ W, a non-leaf) and what the likelihood needs."""
    weights = leaf(torch.randn(11, 11, device=DEVICE) * 0.3)
    h = torch.randn(6, 11, device=DEVICE)
    mu, logvar = leaf(torch.randn(6, 3, device=DEVICE)), leaf(torch.randn(6, 3, device=DEVICE))
    if likelihood == "gaussian":
        return weights, h, torch.randn(6, 11, device=DEVICE), mu, logvar, leaf(torch.randn(6, 11, device=DEVICE))
    return weights, h, torch.rand(6, 11, device=DEVICE), mu, logvar, None


def _oracle_elbo_grads(likelihood, weights, h, target, mu, logvar, decoder_logvar):
    """d(mean -ELBO)/d(weights, mu[, decoder_logvar]) in float64."""
    w, m = leaf(weights.double()), leaf(mu.double())
    wrt = [w, m]
    output = h.double() @ w
    if likelihood == "gaussian":
        dlv = leaf(decoder_logvar.double())
        wrt.append(dlv)
        logp = oracle_gaussian(output, target.double(), dlv)
    else:
        logp = oracle_cb(output, target.double())
    loss = (-logp.sum(1) + oracle_kl(m, logvar.double()).sum(1)).mean()
    return torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("likelihood", ["continuous_bernoulli", "gaussian"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_elbo_loss_hands_over_the_likelihood_gradients(backend, likelihood):
    """With the reduction's weight passed to the likelihood kernel, loss.backward() on the CPU
    returns its forward-pass gradients (both of the Gaussian's) with no pass over [B, D]; a
    second backward over the retained graph recomputes them, and an upstream 2.5 scales them."""
    weights, h, target, mu, logvar, decoder_logvar = _decoder_case(likelihood)
    wrt = (weights, mu) + (() if decoder_logvar is None else (decoder_logvar,))
    with fastvae.use_backend(backend):
        loss = fastvae.elbo_loss(h @ weights, target, mu, logvar, likelihood=likelihood, decoder_logvar=decoder_logvar)
        with RecordPointwiseSizes() as recorder:
            first = torch.autograd.grad(loss, wrt, retain_graph=True)
        second = torch.autograd.grad(loss, wrt, retain_graph=True)
        scaled = torch.autograd.grad(2.5 * loss, wrt)
    expected = _oracle_elbo_grads(likelihood, weights, h, target, mu, logvar, decoder_logvar)
    for name, got, again, times, want in zip(("weights", "mu", "decoder_logvar"), first, second, scaled, expected):
        assert_close_to(got, want, f"grad_{name}")
        assert torch.equal(got, again), f"grad_{name}: a second backward differs from the first"
        assert_close_to(times, 2.5 * want, f"grad_{name} for upstream 2.5")
    if DEVICE.type == "cpu":
        assert h.numel() not in recorder.sizes, "backward ran a pointwise op over [B, D] (scaling a saved gradient)"


@pytest.mark.parametrize("logvar_shape", [(6, 11), (11,), ()], ids=["per-element", "per-feature", "scalar"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_gaussian_elbo_matches_the_traced_one(backend, logvar_shape):
    """Eager, the Gaussian likelihood may hand its saved gradients over; traced (what torch.compile
    runs: the custom op and its fake), it scales them. Same loss and gradients either way."""
    mean, x = leaf(torch.randn(6, 11, device=DEVICE)), torch.randn(6, 11, device=DEVICE)
    decoder_logvar = leaf(torch.randn(logvar_shape, device=DEVICE))
    kl = leaf(torch.rand(6, device=DEVICE) + 0.1)
    torch._dynamo.reset()  # dynamo guards on the backend: each case's traces count against one limit
    traced = torch.compile(fastvae.elbo_loss, backend="aot_eager", fullgraph=True)
    results = {}
    with fastvae.use_backend(backend):
        for path, call in (("eager", fastvae.elbo_loss), ("traced", traced)):
            loss = call(mean, x, kl=kl, likelihood="gaussian", decoder_logvar=decoder_logvar)
            results[path] = (loss, *torch.autograd.grad(loss, (mean, decoder_logvar, kl)))
    mean64, dlv64, kl64 = (leaf(t.detach().double()) for t in (mean, decoder_logvar, kl))
    loss64 = (-oracle_gaussian(mean64, x.double(), dlv64).sum(1) + kl64).mean()
    expected = (loss64, *torch.autograd.grad(loss64, (mean64, dlv64, kl64)))
    for name, a, b, want in zip(
        ("loss", "grad_mean", "grad_decoder_logvar", "grad_kl"), results["eager"], results["traced"], expected
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
        assert_close_to(a, want, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_eager_backward_scales_its_saved_gradient_in_place(backend, likelihood, dtype):
    """When the upstream gradient is not the loss weight (here any [B, D] one), an eager backward
    scales the gradient its forward computed in place: in float32 no [B, D] buffer is allocated.
    Half precision is multiplied in float32 as it is written, with no copy of its own on CUDA;
    the CPU's TensorIterator makes float32 temporaries for any mixed-dtype multiply, so only
    its values are checked here (the GPU run measures its memory)."""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator().manual_seed(11)
    batch, data = 64, 300
    out = leaf(torch.randn(batch, data, generator=generator).to(DEVICE, dtype))
    target = torch.rand(batch, data, generator=generator).to(DEVICE, dtype)
    upstream = torch.randn(batch, data, generator=generator).to(DEVICE)
    with fastvae.use_backend(backend):
        if likelihood == "bernoulli":
            logp = fastvae.bernoulli_log_likelihood(out, target, reduction="none")
        else:
            logp = fastvae.gaussian_log_likelihood(out, target, reduction="none")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            (grad,) = torch.autograd.grad(logp, out, grad_outputs=upstream)
    buffer = batch * data * out.element_size()
    allocated = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= buffer]
    if DEVICE.type == "cpu" and dtype == torch.float32:
        assert not allocated, f"backward allocated a [B, D] buffer: {allocated}"
    x, o = target.double(), out.detach().double()
    dlogp = x - torch.sigmoid(o) if likelihood == "bernoulli" else x - o
    assert_close_to(grad, upstream.double() * dlogp, "grad")
