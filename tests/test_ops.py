"""Every public op (the registry's OPS) on every backend against its float64 oracle: values and
each gradient by name, every reduction, every dtype, odd sizes, batch 1, 4-D images."""

from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae.ops.registry import op_specs

from helpers import BACKENDS, DEVICE, DTYPES, assert_close_to, oracle_noise, oracle_outputs_and_grads

SPECS = op_specs()
# Sizes per axis: odd widths below, inside and beyond one Triton tile row (32, 128, 1024); samples
# K of importance-weighted ops, 1 included (a samples dim of size 1).
SHAPES = {
    "3x7": {"batch": 3, "data": 7, "latent": 5, "samples": 2},
    "41x1100": {"batch": 41, "data": 1100, "latent": 33, "samples": 3},
    "batch1": {"batch": 1, "data": 131, "latent": 2, "samples": 4},
    "image4d": {"batch": 3, "data": (1, 12, 12), "latent": (2, 3), "samples": 1},
}
SEED = 1234


def _call_and_grads(spec, backend, inputs, kwargs):
    """Outputs of the public op on `backend`, and the gradient of each differentiable input for
    random upstream gradients (not 1)."""
    leaves = [x.detach().clone().requires_grad_(arg.differentiable) for arg, x in zip(spec.inputs, inputs)]
    with fastvae.use_backend(backend):
        outputs = spec.fastvae(*leaves, **kwargs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        upstream = [(torch.randn(o.shape, device=DEVICE) + 0.5).to(o.dtype) for o in outputs]
        grads = torch.autograd.grad(outputs, [x for x in leaves if x.requires_grad], upstream)
    return outputs, grads, [u.double() for u in upstream]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_op_matches_its_float64_oracle(spec, backend, dtype, shape):
    generator = torch.Generator().manual_seed(SEED)
    for reduction in spec.reductions or (None,):
        inputs = [
            arg.make(shape, dtype if arg.kind == "param" else torch.float32, DEVICE, generator) for arg in spec.inputs
        ]
        kwargs, oracle_kwargs = spec.size_arguments(shape), spec.size_arguments(shape)
        if reduction is not None:
            kwargs["reduction"] = oracle_kwargs["reduction"] = reduction
        if spec.noise_dims is not None:
            kwargs["generator"] = torch.Generator(DEVICE).manual_seed(SEED)
            oracle_kwargs["eps"] = oracle_noise(spec, shape, SEED, DEVICE)
        outputs, grads, upstream = _call_and_grads(spec, backend, inputs, kwargs)
        expected, expected_grads = oracle_outputs_and_grads(spec, inputs, oracle_kwargs, upstream)
        where = f"{spec.name}[{reduction}]" if reduction else spec.name
        for arg, out, want in zip(spec.outputs, outputs, expected):
            if arg.kind == "loss":
                assert out.dtype == torch.float32, f"{where}: {arg.name} is {out.dtype}, losses are float32"
            assert_close_to(out, want, f"{where} {arg.name}", spec.min_tolerance)
        names = [arg.name for arg in spec.inputs if arg.differentiable]
        for name, got, want in zip(names, grads, expected_grads):
            assert got.dtype == dtype, f"{where}: grad_{name} is {got.dtype}, gradients keep their input's dtype"
            assert_close_to(got, want, f"{where} grad_{name}", spec.min_tolerance)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.benchmark], ids=[s.name for s in SPECS if s.benchmark])
def test_every_benchmarked_op_has_a_plain_pytorch_competitor_that_computes_the_same(spec):
    """The benchmarks time each op against `eager`, the plain PyTorch a user writes: it must exist,
    and (for an op without noise, whose values are comparable) compute what the oracle does, or
    the ratio compares different work."""
    assert spec.eager is not None, f"{spec.name} is benchmarked but has no eager competitor"
    shape = SHAPES["41x1100"]
    generator = torch.Generator().manual_seed(SEED)
    for reduction in spec.reductions or (None,):
        inputs = [arg.make(shape, torch.float64, DEVICE, generator) for arg in spec.inputs]
        kwargs = spec.size_arguments(shape)
        if reduction is not None:
            kwargs["reduction"] = reduction
        eager = spec.eager(*inputs, **kwargs)
        eager = eager if isinstance(eager, tuple) else (eager,)
        if spec.noise_dims is not None:  # its own noise: the shapes must agree, the values cannot
            eps = torch.randn(spec.noise_shape(shape), generator=generator, dtype=torch.float64).to(DEVICE)
            expected = spec.oracle(*inputs, eps=eps, **kwargs)
        else:
            expected = spec.oracle(*inputs, **kwargs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        assert len(eager) == len(expected), spec.name
        for got, want in zip(eager, expected):
            assert got.shape == want.shape, f"{spec.name}[{reduction}]"
            if spec.noise_dims is None:
                assert_close_to(got, want, f"{spec.name}[{reduction}] eager")
