"""The native C++ CPU backend: loading, every kernel against the float64 reference on fresh random
inputs, the Philox stream, dtype conversions, thread-count independence and the errors a user
can cause.

The public ops on the native backend are covered by the op suite (test_ops.py); this file
checks the kernels directly, including what the ops cannot reach (strided rows, mixed dtypes,
bit-exact conversions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastvae.errors import BackendUnavailableError
from fastvae.ops import library
from fastvae.ops.bernoulli import native as bernoulli
from fastvae.ops.bernoulli import reference as bernoulli_reference
from fastvae.ops.continuous_bernoulli import native as continuous_bernoulli
from fastvae.ops.gaussian import native as gaussian
from fastvae.ops.gaussian import reference as gaussian_reference
from fastvae.ops.gaussian_likelihood import native as gaussian_likelihood
from fastvae.ops.iwae import native as iwae
from fastvae.ops.iwae import reference as iwae_reference
from fastvae.ops.iwae.spec import FLOAT32_WEIGHTS_TOLERANCE
from fastvae.ops.noise import philox_normal, philox_uint32x4

from helpers import assert_close_to, needs_library

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(3, 7), (41, 401), (1, 64), (6, 513)]
SEED_VALUE = 2**61 + 12345
SEED = torch.tensor(SEED_VALUE)


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return "x".join(map(str, value))


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _posterior(shape: tuple[int, int], dtype: torch.dtype, strided: bool = False):
    """mu, logvar [B, L] in dtype; strided: two chunks of one wider encoder output."""
    rows, cols = shape
    if strided:
        h = torch.randn(rows, 2 * cols + 5).to(dtype)
        return h[:, 1 : cols + 1], h[:, cols + 3 : 2 * cols + 3]
    return torch.randn(shape).to(dtype), (0.5 * torch.randn(shape)).to(dtype)


def _noise_oracle(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The reference Philox eps the kernel draws in its compute dtype, as float64."""
    return philox_normal(SEED, shape, _loss_dtype(dtype)).double()


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
@needs_library
def test_library_loads_with_openmp():
    assert library.load_error() is None
    assert library.library_path().is_file()
    assert library.has_openmp()


def _probe_in_subprocess(lib_path: str) -> dict:
    """Import fastvae with FASTVAE_NATIVE_LIB=lib_path in a fresh interpreter and report."""
    script = (
        "import json, torch, fastvae\n"
        "from fastvae.ops import library as n\n"
        "from fastvae.ops.gaussian import native as g\n"
        "from fastvae.backend import BackendUnavailableError\n"
        "out = {'load_error': n.load_error(), 'available': fastvae.available_backends()['native']}\n"
        "try:\n"
        "    g.gaussian_kl_forward(torch.randn(2, 3), torch.randn(2, 3), False, False)\n"
        "    out['raised'] = None\n"
        "except BackendUnavailableError as error:\n"
        "    out['raised'] = str(error)\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, FASTVAE_NATIVE_LIB=lib_path)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["missing", "not_a_library"])
def test_bad_library_path_gives_a_clear_error_and_fastvae_still_imports(kind, tmp_path):
    path = tmp_path / "_native_cpu.so"
    if kind == "not_a_library":
        path.write_text("not an ELF file")
    report = _probe_in_subprocess(str(path))
    reason = report["load_error"]
    assert reason is not None and str(path) in reason
    assert "pip install -e ." in reason and "cmake -S . -B build" in reason
    assert report["available"] == reason
    assert report["raised"] is not None and "native" in report["raised"] and str(path) in report["raised"]


# ---------------------------------------------------------------------------
# reparameterize_kl forward / backward
# ---------------------------------------------------------------------------
@needs_library
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("with_eps", [False, True], ids=["philox", "eps"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_reparameterize_kl_forward_matches_float64(dtype, shape, with_eps, strided, samples):
    mu, logvar = _posterior(shape, dtype, strided)
    z_shape = (samples * shape[0], shape[1])
    eps = torch.randn(z_shape).to(dtype) if with_eps else None
    z, kl = gaussian.reparameterize_kl_forward(mu, logvar, eps, SEED, samples)
    assert z.dtype == dtype and z.shape == z_shape and kl.dtype == _loss_dtype(dtype) and kl.shape == shape[:1]
    eps64 = eps.double() if with_eps else _noise_oracle(z_shape, dtype)
    z64, kl64 = gaussian_reference.reparameterize_kl_forward(mu.double(), logvar.double(), eps64, 0, samples)
    assert_close_to(z, z64, "z")
    assert_close_to(kl, kl64, "kl")


@needs_library
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("grads", ["z+kl", "z", "kl", "none"])
@pytest.mark.parametrize("with_eps", [False, True], ids=["philox", "eps"])
@pytest.mark.parametrize("shape", [(3, 7), (41, 401)], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_reparameterize_kl_backward_matches_float64(dtype, shape, with_eps, grads, samples):
    mu, logvar = _posterior(shape, dtype, strided=True)
    z_shape = (samples * shape[0], shape[1])
    eps = torch.randn(z_shape).to(dtype) if with_eps else None
    grad_z = torch.randn(z_shape).to(dtype) if "z" in grads else None
    grad_kl = (torch.rand(shape[0]) + 0.5) if "kl" in grads else None  # [B] float32, an upstream scale != 1
    grad_mu, grad_logvar = gaussian.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, SEED, samples)
    assert grad_mu.dtype == dtype and grad_logvar.dtype == dtype and grad_mu.shape == shape
    eps64 = eps.double() if with_eps else _noise_oracle(z_shape, dtype)
    expected = gaussian_reference.reparameterize_kl_backward(
        None if grad_z is None else grad_z.double(),
        None if grad_kl is None else grad_kl.double(),
        mu.double(),
        logvar.double(),
        eps64,
        0,
        samples,
    )
    assert_close_to(grad_mu, expected[0], "grad_mu")
    assert_close_to(grad_logvar, expected[1], "grad_logvar")


@needs_library
@pytest.mark.parametrize("layout", ["broadcast", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_reparameterize_kl_backward_reads_grad_kl_at_its_stride(dtype, layout):
    """grad_kl as the backward of kl.sum() gives it (one value expanded, stride 0) and as
    every other element of a longer tensor (stride 2): read in place, no copy, same result."""
    shape = (41, 401)
    mu, logvar = _posterior(shape, dtype, strided=True)
    grad_z = torch.randn(shape).to(dtype)
    grad_kl = torch.tensor(0.7).expand(shape[0]) if layout == "broadcast" else (torch.rand(2 * shape[0]) + 0.5)[::2]
    assert grad_kl.stride(0) == (0 if layout == "broadcast" else 2)
    grad_mu, grad_logvar = gaussian.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, None, SEED)
    expected = gaussian_reference.reparameterize_kl_backward(
        grad_z.double(), grad_kl.double(), mu.double(), logvar.double(), _noise_oracle(shape, dtype), 0
    )
    assert_close_to(grad_mu, expected[0], "grad_mu")
    assert_close_to(grad_logvar, expected[1], "grad_logvar")


@needs_library
def test_backward_regenerates_the_forward_noise():
    """dz/dlogvar = 0.5 * (z - mu): with grad_z = 1 the regenerated eps must be the forward one."""
    mu, logvar = _posterior((17, 301), torch.float32)
    z, _ = gaussian.reparameterize_kl_forward(mu, logvar, None, SEED)
    _, grad_logvar = gaussian.reparameterize_kl_backward(torch.ones_like(mu), None, mu, logvar, None, SEED)
    torch.testing.assert_close(grad_logvar, 0.5 * (z - mu), rtol=1e-5, atol=1e-5)


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_id)
def test_philox_noise_equals_the_reference_stream(dtype):
    shape = (64, 1000)
    zeros = torch.zeros(shape, dtype=dtype)
    eps, _ = gaussian.reparameterize_kl_forward(zeros, zeros, None, SEED)  # z = eps when mu = logvar = 0
    expected = philox_normal(SEED, shape, dtype)
    # float32: the kernel's log/cos differ from torch's by ulps, amplified by sqrt(-2 ln u) <= 5.8.
    torch.testing.assert_close(eps, expected, rtol=0, atol=5e-6 if dtype == torch.float32 else 1e-12)
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02
    other, _ = gaussian.reparameterize_kl_forward(zeros, zeros, None, SEED + 1)
    assert (other != eps).float().mean() > 0.99


def _philox_words(version: int, seed: int, first_group: int) -> torch.Tensor | None:
    """The words [4, 16] of 16 Philox groups from one version of the kernel, None if the CPU lacks it."""
    words = torch.empty(4, 16, dtype=torch.int32)
    status = library.function("fastvae_philox_words")(version, seed, first_group, words.data_ptr())
    return None if status != 0 else words.view(torch.uint32).to(torch.int64)


@needs_library
def test_every_philox_version_this_cpu_runs_gives_the_reference_words():
    """The noise kernels pick an AVX-512, AVX2 or portable Philox at load time: each one this
    CPU can run must give the reference's words, including counters whose low word carries."""
    runnable = [v for v in (0, 1, 2) if _philox_words(v, 0, 0) is not None]
    assert 0 in runnable and library.function("fastvae_philox_version")() == max(runnable)
    generator = torch.Generator().manual_seed(7)
    random_seed = int(torch.randint(0, 2**62, (), generator=generator))
    for seed in (0, SEED_VALUE, 2**64 - 1, random_seed):
        for first in (0, 2**32 - 5, 2**40 + 3):
            counters = torch.arange(first, first + 16, dtype=torch.int64)
            expected = torch.stack(philox_uint32x4(seed, counters))
            for version in runnable:
                assert torch.equal(_philox_words(version, seed, first), expected), (version, seed, first)


# ---------------------------------------------------------------------------
# gaussian_kl, bernoulli_log_likelihood
# ---------------------------------------------------------------------------
@needs_library
@pytest.mark.parametrize("compute_grad", [False, True], ids=["loss", "loss+grad"])
@pytest.mark.parametrize("elementwise", [False, True], ids=["rows", "elementwise"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_gaussian_kl_matches_float64(dtype, shape, elementwise, compute_grad):
    mu, logvar = _posterior(shape, dtype, strided=True)
    kl, grad_mu, grad_logvar = gaussian.gaussian_kl_forward(mu, logvar, elementwise, compute_grad)
    kl64, grad_mu64, grad_logvar64 = gaussian_reference.gaussian_kl_forward(
        mu.double(), logvar.double(), elementwise, True
    )
    assert kl.dtype == _loss_dtype(dtype) and kl.shape == kl64.shape
    assert_close_to(kl, kl64, "kl")
    if not compute_grad:
        assert grad_mu is None and grad_logvar is None
        return
    assert torch.equal(grad_mu, mu)
    assert_close_to(grad_logvar, grad_logvar64, "grad_logvar")


@needs_library
@pytest.mark.parametrize("compute_grad", [False, True], ids=["loss", "loss+grad"])
@pytest.mark.parametrize("elementwise", [False, True], ids=["rows", "elementwise"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_bernoulli_log_likelihood_matches_float64(dtype, shape, elementwise, compute_grad):
    wide = (4 * torch.randn(shape[0], shape[1] + 9)).to(dtype)
    logits = wide[:, 4 : 4 + shape[1]]  # strided rows
    target = torch.rand(shape).to(dtype)
    logp, grad = bernoulli.bernoulli_forward(logits, target, elementwise, compute_grad)
    logp64, grad64 = bernoulli_reference.bernoulli_forward(logits.double(), target.double(), elementwise, True)
    assert logp.dtype == _loss_dtype(dtype) and logp.shape == logp64.shape
    assert_close_to(logp, logp64, "logp")
    if compute_grad:
        assert grad.dtype == dtype
        assert_close_to(grad, grad64, "grad_logits")
    else:
        assert grad is None


def _samples_of(posterior_shape: tuple[int, int], samples: int, dtype: torch.dtype):
    """z [K * B, L] as strided rows (a slice of a wider tensor), log p [K, B] in the compute dtype."""
    rows, cols = posterior_shape
    z = torch.randn(samples * rows, cols + 3).to(dtype)[:, 1 : cols + 1]
    return z, 20 * torch.randn(samples, rows, dtype=_loss_dtype(dtype))


@needs_library
@pytest.mark.parametrize("samples", [1, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_iwae_forward_matches_float64(dtype, shape, samples):
    mu, logvar = _posterior(shape, dtype, strided=True)
    z, logp = _samples_of(shape, samples, dtype)
    loss, weights = iwae.iwae_forward(logp, z, mu, logvar)
    assert loss.dtype == weights.dtype == _loss_dtype(dtype)
    assert loss.shape == shape[:1] and weights.shape == (samples, shape[0])
    loss64, weights64 = iwae_reference.iwae_forward(logp.double(), z.double(), mu.double(), logvar.double())
    assert_close_to(loss, loss64, "loss")
    # A softmax of float32 log weights summed over hundreds of latent dims: see the spec.
    assert_close_to(weights, weights64, "weights", FLOAT32_WEIGHTS_TOLERANCE)


@needs_library
@pytest.mark.parametrize("dreg", [False, True], ids=["iwae", "dreg"])
@pytest.mark.parametrize("layout", ["contiguous", "broadcast", "strided"])
@pytest.mark.parametrize("shape", [(3, 7), (41, 401)], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_iwae_backward_matches_float64(dtype, shape, layout, dreg):
    """grad_rows as given, as the backward of a mean gives it (one value, stride 0) and strided."""
    samples = 4
    mu, logvar = _posterior(shape, dtype, strided=True)
    z, _ = _samples_of(shape, samples, dtype)
    weights = torch.softmax(torch.randn(samples, shape[0], dtype=_loss_dtype(dtype)), dim=0)
    grad_rows = {
        "contiguous": torch.rand(shape[0]) + 0.5,
        "broadcast": torch.tensor(0.3).expand(shape[0]),
        "strided": (torch.rand(2 * shape[0]) + 0.5)[::2],
    }[layout]
    grads = iwae.iwae_backward(grad_rows, weights, z, mu, logvar, dreg)
    expected = iwae_reference.iwae_backward(
        grad_rows.double(), weights.double(), z.double(), mu.double(), logvar.double(), dreg
    )
    for name, got, want in zip(("z", "mu", "logvar"), grads, expected):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close_to(got, want, f"grad_{name}")
    if dreg:
        assert not grads[1].any() and not grads[2].any()


MIXED = [
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.float64),
    (torch.bfloat16, torch.float64),
]


@needs_library
@pytest.mark.parametrize("first, second", MIXED, ids=[f"{_id(a)}-{_id(b)}" for a, b in MIXED])
def test_mixed_dtypes_follow_the_contract(first, second):
    loss_dtype = _loss_dtype(second) if second == torch.float64 else torch.float32
    logits, target = (4 * torch.randn(9, 301)).to(first), torch.rand(9, 301).round().to(second)
    logp, grad = bernoulli.bernoulli_forward(logits, target, False, True)
    logp64, grad64 = bernoulli_reference.bernoulli_forward(logits.double(), target.double(), False, True)
    assert logp.dtype == loss_dtype and grad.dtype == first
    assert_close_to(logp, logp64, "logp")
    assert_close_to(grad, grad64, "grad_logits")

    mu, logvar = torch.randn(9, 33).to(first), torch.randn(9, 33).to(second)
    z, kl = gaussian.reparameterize_kl_forward(mu, logvar, None, SEED)
    assert z.dtype == first and kl.dtype == loss_dtype
    z64, kl64 = gaussian_reference.reparameterize_kl_forward(
        mu.double(), logvar.double(), _noise_oracle((9, 33), loss_dtype), 0
    )
    assert_close_to(z, z64, "z")
    assert_close_to(kl, kl64, "kl")
    grad_mu, grad_logvar = gaussian.reparameterize_kl_backward(
        torch.randn(9, 33).to(second), None, mu, logvar, None, SEED
    )
    assert grad_mu.dtype == first and grad_logvar.dtype == second


# ---------------------------------------------------------------------------
# Extreme inputs, conversions, threads
# ---------------------------------------------------------------------------
@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_id)
def test_extreme_inputs_stay_finite_and_accurate(dtype):
    logits = torch.tensor([[-100.0, 100.0, -30.0, 30.0, 0.0, -88.0, 88.5, -1e-6]]).repeat(3, 1).to(dtype)
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.3]]).repeat(3, 1).to(dtype)
    logp, grad = bernoulli.bernoulli_forward(logits, target, True, True)
    logp64, grad64 = bernoulli_reference.bernoulli_forward(logits.double(), target.double(), True, True)
    assert torch.isfinite(logp).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(logp.double(), logp64, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=1e-6)
    assert_close_to(grad, grad64, "grad_logits")

    mu = torch.tensor([[0.5, -2.0, 3.0, 0.0, 1e-3, -1e-3]]).repeat(2, 1).to(dtype)
    logvar = torch.tensor([[-30.0, 30.0, 1e-6, -1e-6, 20.0, -20.0]]).repeat(2, 1).to(dtype)
    kl, _, grad_logvar = gaussian.gaussian_kl_forward(mu, logvar, True, True)
    kl64, _, grad_logvar64 = gaussian_reference.gaussian_kl_forward(mu.double(), logvar.double(), True, True)
    assert torch.isfinite(kl).all() and torch.isfinite(grad_logvar).all()
    torch.testing.assert_close(kl.double(), kl64, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=1e-9)
    assert_close_to(grad_logvar, grad_logvar64, "grad_logvar")
    z, kl_rows = gaussian.reparameterize_kl_forward(mu, logvar, None, SEED)
    grads = gaussian.reparameterize_kl_backward(torch.ones_like(mu), torch.ones(2), mu, logvar, None, SEED)
    assert all(torch.isfinite(t).all() for t in (z, kl_rows, *grads))


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equal, except that any NaN matches any NaN and -0 matches +0 (gradients
    are sums that start from +0, in the reference too)."""
    nan = torch.isnan(expected)
    assert torch.isnan(actual[nan]).all()
    actual, expected = actual[~nan] + 0, expected[~nan] + 0
    assert torch.equal(actual.view(torch.int16), expected.view(torch.int16))


@needs_library
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_half_conversions_are_exact(dtype):
    """Every 16-bit pattern survives load -> store, and fp32 -> half rounds like torch (nearest even)."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
    grad_mu, _ = gaussian.reparameterize_kl_backward(
        None, torch.ones(patterns.shape[0]), patterns, torch.zeros_like(patterns), None, SEED
    )
    _assert_same_bits(grad_mu, patterns)
    # grad_mu = grad_kl * mu with mu = 1: the kernel's rounding of arbitrary float32 values.
    values = torch.cat(
        [
            torch.randn(4000) * 10.0 ** torch.randint(-9, 6, (4000,)),
            torch.tensor(
                [
                    65504.0,
                    65519.0,
                    65520.0,
                    1e6,
                    2.0**-24,
                    3 * 2.0**-26,
                    2.0**-26,
                    1 + 2.0**-11,
                    1 + 3 * 2.0**-11,
                    1 + 2.0**-8,
                    3e38,
                    float("inf"),
                    -float("inf"),
                    float("nan"),
                    0.0,
                    -0.0,
                ]
            ),
        ]
    )
    ones = torch.ones(values.shape[0], 1, dtype=dtype)
    rounded, _ = gaussian.reparameterize_kl_backward(None, values, ones, torch.zeros_like(ones), None, SEED)
    _assert_same_bits(rounded, values.to(dtype).reshape(-1, 1))


@needs_library
def test_results_do_not_depend_on_the_thread_count():
    shape = (257, 401)  # large enough to run in parallel
    mu, logvar = _posterior(shape, torch.float32, strided=True)
    logits, target = 3 * torch.randn(shape), torch.rand(shape)
    grad_z, grad_kl = torch.randn(shape), torch.rand(shape[0])
    data, shared_logvar = torch.randn(shape), torch.randn(1, shape[1])
    grad_z_samples = torch.randn(3 * shape[0], shape[1])  # 3 samples: one noise cursor per sample and thread

    z_samples, logp = 0.5 * torch.randn(3 * shape[0], shape[1]), 10 * torch.randn(3, shape[0])
    weights = torch.softmax(torch.randn(3, shape[0]), dim=0)

    def run_all():
        return (
            *iwae.iwae_forward(logp, z_samples, mu, logvar),
            *iwae.iwae_backward(grad_kl, weights, z_samples, mu, logvar, False),
            *gaussian.reparameterize_kl_forward(mu, logvar, None, SEED),
            *gaussian.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, None, SEED),
            *gaussian.reparameterize_kl_forward(mu, logvar, None, SEED, 3),
            *gaussian.reparameterize_kl_backward(grad_z_samples, grad_kl, mu, logvar, None, SEED, 3),
            *gaussian.gaussian_kl_forward(mu, logvar, False, True),
            *bernoulli.bernoulli_forward(logits, target, False, True),
            *continuous_bernoulli.continuous_bernoulli_forward(logits, target[:1], False, True, -0.3),
            *gaussian_likelihood.gaussian_likelihood_forward(logits, data, shared_logvar, False, True, -0.3),
            *gaussian_likelihood.gaussian_likelihood_forward(logits, data, None, True, True)[:2],
        )

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_all()
        torch.set_num_threads(2)
        double = run_all()
    finally:
        torch.set_num_threads(before)
    for index, (a, b) in enumerate(zip(single, double)):
        assert torch.equal(a, b), f"output {index} differs between 1 and 2 threads"


# ---------------------------------------------------------------------------
# Errors a caller can cause
# ---------------------------------------------------------------------------
@needs_library
def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"logvar \[4, 6\] must have the shape \[4, 5\]"):
        gaussian.gaussian_kl_forward(x, torch.randn(4, 6), False, False)
    with pytest.raises(ValueError, match=r"2-D row view"):
        bernoulli.bernoulli_forward(torch.randn(2, 3, 4), torch.rand(2, 3, 4), False, False)
    with pytest.raises(ValueError, match=r"target \[3, 5\] must have 5 columns and a row count that divides 4"):
        bernoulli.bernoulli_forward(x, torch.rand(3, 5), False, False)
    with pytest.raises(ValueError, match=r"target \[2, 4\] must have 5 columns"):
        bernoulli.bernoulli_forward(x, torch.rand(2, 4), False, False)
    with pytest.raises(TypeError, match="int64; use float32"):
        bernoulli.bernoulli_forward(x, torch.ones(4, 5, dtype=torch.int64), False, False)
    with pytest.raises(ValueError, match="meta; the native kernels take CPU tensors"):
        gaussian.gaussian_kl_forward(x.to("meta"), x.to("meta"), False, False)
    with pytest.raises(ValueError, match=r"seed -1 must be >= 0"):
        gaussian.reparameterize_kl_forward(x, x, None, torch.tensor(-1))
    with pytest.raises(ValueError, match=r"grad_kl \[5\] must have shape \[4\]"):
        gaussian.reparameterize_kl_backward(None, torch.ones(5), x, x, None, SEED)
    with pytest.raises(ValueError, match=r"z \[8, 5\] must have the shape \[12, 5\]"):
        iwae.iwae_forward(torch.randn(3, 4), torch.randn(8, 5), x, x)
    with pytest.raises(ValueError, match=r"grad_rows \[3\] must have shape \[4\]"):
        iwae.iwae_backward(torch.ones(3), torch.rand(2, 4), torch.randn(8, 5), x, x, False)


def test_missing_library_makes_every_function_raise(monkeypatch):
    monkeypatch.setattr(library, "_load", lambda: (None, None, "not built (test)"))
    library.function.cache_clear()
    try:
        assert library.load_error() == "not built (test)"
        with pytest.raises(BackendUnavailableError, match="native.*not built"):
            bernoulli.bernoulli_forward(torch.randn(2, 3), torch.rand(2, 3), False, False)
    finally:
        library.function.cache_clear()
