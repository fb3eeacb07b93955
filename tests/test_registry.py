"""The registry is the one list of ops: every backend implements every kernel of every family with
the reference's signature, and every public op of fastvae has a test and benchmark spec."""

from __future__ import annotations

import inspect

import pytest

import fastvae
from fastvae.ops.registry import BACKEND_MODULES, FAMILIES, op_specs

FAMILY_BACKENDS = [(family, backend) for family in FAMILIES for backend in BACKEND_MODULES if backend != "torch"]


@pytest.mark.parametrize("family, backend", FAMILY_BACKENDS, ids=[f"{f.name}-{b}" for f, b in FAMILY_BACKENDS])
def test_every_backend_implements_every_kernel_with_the_reference_signature(family, backend):
    reference, module = family.module("torch"), family.module(backend)
    for kernel in family.kernels:
        assert hasattr(reference, kernel), f"{family.name}: the reference lacks kernel {kernel}"
        assert hasattr(module, kernel), f"{family.name}: backend {backend} lacks kernel {kernel}"
        expected = list(inspect.signature(getattr(reference, kernel)).parameters)
        actual = list(inspect.signature(getattr(module, kernel)).parameters)
        assert actual == expected, f"{family.name}.{kernel} on {backend}: parameters {actual} != reference {expected}"


def test_every_public_op_has_a_spec():
    """The ops tests and benchmarks iterate op_specs(): a public function missing from it would be
    neither tested against an oracle nor benchmarked."""
    tested = {spec.fastvae for spec in op_specs()} | {spec.name for spec in op_specs()}
    public_ops = [
        "reparameterize_kl",
        "gaussian_kl",
        "bernoulli_log_likelihood",
        "continuous_bernoulli_log_likelihood",
        "gaussian_log_likelihood",
        "elbo_loss",
        "iwae_loss",
    ]
    for name in public_ops:
        assert getattr(fastvae, name) in tested or name in tested, f"fastvae.{name} has no OpSpec"


def test_spec_names_are_unique_and_each_family_has_ops():
    names = [spec.name for spec in op_specs()]
    assert len(names) == len(set(names)), names
    for family in FAMILIES:
        assert family.spec().OPS, f"family {family.name} declares no ops"
