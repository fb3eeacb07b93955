"""bernoulli_log_likelihood: log p(x | logits) summed per datapoint, averaged over the batch.

Competitor: binary_cross_entropy_with_logits as a user writes the reconstruction
term (per element, summed over pixels, averaged over the batch), negated.
"""

import torch.nn.functional as F

import fastvae
from benchmarks.harness import OpBench, TensorSpec, run_case


def eager_bernoulli_log_likelihood(logits, target):
    """logits, target [B, D] -> mean over B of sum over D of log p (a scalar <= 0)."""
    return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()


def fastvae_bernoulli_log_likelihood(logits, target):
    return fastvae.bernoulli_log_likelihood(logits, target)


OP = OpBench(
    name="bernoulli_log_likelihood",
    inputs=(TensorSpec("logits", ("batch", "data"), scale=2.0),
            TensorSpec("target", ("batch", "data"), kind="target", binary=True)),
    outputs=(TensorSpec("logp", (), kind="loss"),),
    differentiable=("logits",),
    eager=eager_bernoulli_log_likelihood,
    fastvae=fastvae_bernoulli_log_likelihood,
)


def test_bernoulli_log_likelihood(benchmark, case, device, bench_seconds):
    run_case(benchmark, OP, case, device, bench_seconds)
