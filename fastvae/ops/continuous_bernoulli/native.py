"""The continuous Bernoulli log-likelihood on the native CPU backend: the binding of
kernels/continuous_bernoulli.cpp.

Logits and target are read in the dtypes of common.likelihood_inputs (bf16 logits against
float32 data without a copy); the target may have fewer rows than the logits (see reference.py).
"""

from __future__ import annotations

from torch import Tensor

from fastvae.ops import library
from fastvae.ops.common import likelihood_inputs, loss_dtype
from fastvae.ops.library import check_periodic_rows, check_rows

library.declare("""
int fastvae_continuous_bernoulli_forward(
    int logits_dtype, int target_dtype, int64_t rows, int64_t cols,
    const void* logits, int64_t logits_stride, const void* target, int64_t target_stride, int64_t target_rows,
    int elementwise, void* logp, void* grad_logits, double weight, int num_threads);
""")


def continuous_bernoulli_forward(
    logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool, weight: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """logits [B, D], target [T, D] (T divides B) -> log p ([B, D] if elementwise else [B]),
    weight * dlogp/dlogits (or None)."""
    logits = check_rows("logits", logits)
    target = check_periodic_rows("target", target, logits)
    (l,), x = likelihood_inputs((logits,), target)
    logp, grad = library.call_logits_likelihood(
        "fastvae_continuous_bernoulli_forward", l, x, elementwise, compute_grad, weight, loss_dtype(l)
    )
    return logp, grad if grad is None or grad.dtype == logits.dtype else grad.to(logits.dtype)
