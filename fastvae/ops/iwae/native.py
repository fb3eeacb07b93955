"""The importance-weighted bound's latent terms and weights on the native CPU backend: the binding of
kernels/iwae.cpp.

z, mu and logvar are row views passed by pointer with their row stride (no copy) in one storage
dtype (mixes are upcast first, see storage_dtype); log p, the weights and grad_rows travel in
the compute dtype of that storage dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.ops import library
from fastvae.ops.common import loss_dtype, storage_dtype
from fastvae.ops.library import DTYPE_CODES, check_rows, num_threads

library.declare("""
int fastvae_iwae_forward(
    int dtype, int64_t samples, int64_t rows, int64_t cols, const void* logp,
    const void* z, int64_t z_stride, const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    void* loss, void* weights, int num_threads);
int fastvae_iwae_backward(
    int dtype, int64_t samples, int64_t rows, int64_t cols,
    const void* grad_rows, int64_t grad_rows_stride, const void* weights,
    const void* z, int64_t z_stride, const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    int dreg, void* grad_z, void* grad_mu, void* grad_logvar, int num_threads);
""")


def _latent(
    per_sample: Tensor, z: Tensor, mu: Tensor, logvar: Tensor
) -> tuple[torch.dtype, torch.dtype, Tensor, Tensor, Tensor]:
    """The storage dtype, its compute dtype and z, mu, logvar checked and in that storage dtype, for a
    [K, B] per-sample tensor (log p or the weights): float64 throughout when it is float64."""
    mu = check_rows("mu", mu)
    logvar = check_rows("logvar", logvar, mu.shape)
    samples, rows = per_sample.shape
    z = check_rows("z", z, torch.Size((samples * rows, mu.shape[1])))
    dtype = torch.float64 if per_sample.dtype == torch.float64 else storage_dtype(z, mu, logvar)
    z, mu, logvar = (t if t.dtype == dtype else t.to(dtype) for t in (z, mu, logvar))
    return dtype, loss_dtype(z), z, mu, logvar


def iwae_forward(logp: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """log p [K, B], z [K * B, L], mu and logvar [B, L] -> the loss rows [B] and the normalized
    weights [K, B], in the compute dtype."""
    dtype, compute, z, mu, logvar = _latent(logp, z, mu, logvar)
    samples, rows = logp.shape
    logp = logp.to(compute).contiguous()
    loss = torch.empty(rows, dtype=compute)
    weights = torch.empty((samples, rows), dtype=compute)
    library.call(
        "fastvae_iwae_forward",
        DTYPE_CODES[dtype],
        samples,
        rows,
        mu.shape[1],
        logp.data_ptr(),
        z.data_ptr(),
        z.stride(0),
        mu.data_ptr(),
        mu.stride(0),
        logvar.data_ptr(),
        logvar.stride(0),
        loss.data_ptr(),
        weights.data_ptr(),
        num_threads(),
    )
    return loss, weights


def iwae_backward(
    grad_rows: Tensor, weights: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, dreg: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_rows [B], weights [K, B] -> grad_z [K * B, L], grad_mu and grad_logvar [B, L] (zero for
    DReG), in z's, mu's and logvar's dtypes."""
    z_dtype, mu_dtype, logvar_dtype = z.dtype, mu.dtype, logvar.dtype
    dtype, compute, z, mu, logvar = _latent(weights, z, mu, logvar)
    samples, rows = weights.shape
    if grad_rows.shape != (rows,):
        raise ValueError(f"native backend: grad_rows {list(grad_rows.shape)} must have shape [{rows}]")
    # Any element stride, 0 included: the backward of loss.sum() hands over one value expanded.
    grad_rows = grad_rows.to(device="cpu", dtype=compute)
    weights = weights.to(compute).contiguous()
    grad_z = torch.empty((samples * rows, mu.shape[1]), dtype=dtype)
    grad_mu, grad_logvar = torch.empty(mu.shape, dtype=dtype), torch.empty(mu.shape, dtype=dtype)
    library.call(
        "fastvae_iwae_backward",
        DTYPE_CODES[dtype],
        samples,
        rows,
        mu.shape[1],
        grad_rows.data_ptr(),
        grad_rows.stride(0),
        weights.data_ptr(),
        z.data_ptr(),
        z.stride(0),
        mu.data_ptr(),
        mu.stride(0),
        logvar.data_ptr(),
        logvar.stride(0),
        int(bool(dreg)),
        grad_z.data_ptr(),
        grad_mu.data_ptr(),
        grad_logvar.data_ptr(),
        num_threads(),
    )
    return grad_z.to(z_dtype), grad_mu.to(mu_dtype), grad_logvar.to(logvar_dtype)
