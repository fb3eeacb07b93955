"""The Gaussian log-likelihood on the native CPU backend: the binding of kernels/gaussian_likelihood.cpp.

Mean and log-variance are read in one storage dtype and the target in the dtype paired with it
(common.likelihood_inputs); target and log-variance may have fewer rows than the mean (see
reference.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.ops import library
from fastvae.ops.common import likelihood_inputs, loss_dtype
from fastvae.ops.gaussian_likelihood.reference import logvar_grad_dtype
from fastvae.ops.library import DTYPE_CODES, check_periodic_rows, check_rows, num_threads, pointer, row_stride

library.declare("""
int fastvae_gaussian_likelihood_forward(
    int param_dtype, int target_dtype, int grad_logvar_dtype, int64_t rows, int64_t cols,
    const void* mean, int64_t mean_stride, const void* target, int64_t target_stride, int64_t target_rows,
    const void* logvar, int64_t logvar_stride, int64_t logvar_rows,
    int elementwise, void* logp, void* grad_mean, void* grad_logvar, double weight, int num_threads);
""")


def gaussian_likelihood_forward(
    mean: Tensor, target: Tensor, logvar: Tensor | None, elementwise: bool, compute_grad: bool, weight: float = 1.0
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """mean [B, D], target [T, D], logvar [R, D] | None (T, R divide B) -> log p ([B, D] if elementwise
    else [B]), weight * dlogp/dmean, weight * dlogp/dlogvar [B, D] (None without compute_grad or logvar)."""
    mean = check_rows("mean", mean)
    target = check_periodic_rows("target", target, mean)
    logvar = None if logvar is None else check_periodic_rows("logvar", logvar, mean)
    (m, s), x = likelihood_inputs((mean, logvar), target)
    rows, cols = m.shape
    logp = torch.empty((rows, cols) if elementwise else (rows,), dtype=loss_dtype(m))
    dmean = torch.empty((rows, cols), dtype=m.dtype) if compute_grad else None
    dlogvar = torch.empty((rows, cols), dtype=logvar_grad_dtype(m, x, s)) if compute_grad and s is not None else None
    library.call(
        "fastvae_gaussian_likelihood_forward",
        DTYPE_CODES[m.dtype],
        DTYPE_CODES[x.dtype],
        DTYPE_CODES[m.dtype if dlogvar is None else dlogvar.dtype],
        rows,
        cols,
        m.data_ptr(),
        m.stride(0),
        x.data_ptr(),
        x.stride(0),
        x.shape[0],
        pointer(s),
        row_stride(s),
        1 if s is None else s.shape[0],
        int(bool(elementwise)),
        logp.data_ptr(),
        pointer(dmean),
        pointer(dlogvar),
        float(weight),
        num_threads(),
    )
    if dmean is not None:
        dmean = dmean.to(mean.dtype)
    if dlogvar is not None:
        dlogvar = dlogvar.to(logvar_grad_dtype(mean, target, logvar))
    return logp, dmean, dlogvar
