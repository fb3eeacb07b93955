"""The decoder likelihoods p(x | z) fastvae fuses, by name: the one table elbo_loss, iwae_loss,
their modules and validation read.

Every likelihood's forward kernel follows one contract (see fastvae/ops/bernoulli/reference.py):
(output [R, D], target [T, D] with T dividing R: row r against row r % T, elementwise,
compute_grad, weight) -> log p and weight * the output's gradient; the Gaussian's also takes the
decoder's log-variance after the target. Adding a likelihood is its family folder and a line
here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastvae.ops.bernoulli.op import bernoulli_log_likelihood_fused
from fastvae.ops.bernoulli.reference import bernoulli_forward
from fastvae.ops.common import FusedOp
from fastvae.ops.continuous_bernoulli.op import continuous_bernoulli_log_likelihood_fused
from fastvae.ops.continuous_bernoulli.reference import continuous_bernoulli_forward
from fastvae.ops.gaussian_likelihood.op import gaussian_log_likelihood_fused
from fastvae.ops.gaussian_likelihood.reference import gaussian_likelihood_forward


@dataclass(frozen=True)
class Likelihood:
    """family: the op family (fastvae/ops/<family>/); kernel: its forward kernel's name; reference:
    that kernel in the family's reference (held here, not looked up, so that composites trace under
    torch.compile); fused: the op the public functions call; target_in_unit_interval: a target
    outside [0, 1] is no data of this likelihood (NaN, and a ValueError where values are readable);
    takes_logvar: the decoder also gives a log-variance (the Gaussian)."""

    family: str
    kernel: str
    reference: Callable
    fused: FusedOp
    target_in_unit_interval: bool
    takes_logvar: bool = False


LIKELIHOODS: dict[str, Likelihood] = {
    "bernoulli": Likelihood(
        "bernoulli",
        "bernoulli_forward",
        bernoulli_forward,
        bernoulli_log_likelihood_fused,
        target_in_unit_interval=True,
    ),
    "continuous_bernoulli": Likelihood(
        "continuous_bernoulli",
        "continuous_bernoulli_forward",
        continuous_bernoulli_forward,
        continuous_bernoulli_log_likelihood_fused,
        target_in_unit_interval=True,
    ),
    "gaussian": Likelihood(
        "gaussian_likelihood",
        "gaussian_likelihood_forward",
        gaussian_likelihood_forward,
        gaussian_log_likelihood_fused,
        target_in_unit_interval=False,
        takes_logvar=True,
    ),
}
