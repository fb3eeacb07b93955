"""The Bernoulli log-likelihood on the native CPU backend: the binding of kernels/bernoulli.cpp.

Any mix of float32/bfloat16/float16 logits and targets runs without a copy; float64 with
another dtype is upcast to float64, where the math then runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.ops import library
from fastvae.ops.common import loss_dtype
from fastvae.ops.library import check_periodic_rows, check_rows

library.declare("""
int fastvae_bernoulli_forward(
    int logits_dtype, int target_dtype, int64_t rows, int64_t cols,
    const void* logits, int64_t logits_stride, const void* target, int64_t target_stride, int64_t target_rows,
    int elementwise, void* logp, void* grad_logits, double weight, int num_threads);
""")


def bernoulli_forward(
    logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool, weight: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """logits [B, D], target [T, D] (T dividing B: logits row r against target row r % T) -> log p
    ([B, D] if elementwise else [B]), weight * dlogp/dlogits (or None)."""
    logits = check_rows("logits", logits)
    target = check_periodic_rows("target", target, logits)
    compute = loss_dtype(logits, target)
    l, x = (logits.to(compute), target.to(compute)) if compute == torch.float64 else (logits, target)
    logp, grad = library.call_logits_likelihood(
        "fastvae_bernoulli_forward", l, x, elementwise, compute_grad, weight, compute
    )
    return logp, grad if grad is None or grad.dtype == logits.dtype else grad.to(logits.dtype)
