"""The Gaussian posterior on the native CPU backend: the binding of kernels/gaussian.cpp.

Inputs are row views [B, L] passed by pointer with their row stride (no copy); outputs
are allocated here and filled by C++. The kernels read one storage dtype: when mu,
logvar (eps, grad_z) differ, they are upcast to the compute dtype first (storage_dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.ops import library
from fastvae.ops.common import as_dtype, loss_dtype, storage_dtype
from fastvae.ops.library import DTYPE_CODES, check_rows, num_threads, pointer, row_stride, seed_value

library.declare("""
int fastvae_reparameterize_kl_forward(
    int dtype, int64_t rows, int64_t cols, int64_t samples,
    const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    const void* eps, int64_t eps_stride, uint64_t seed,
    void* z, void* kl, int num_threads);
int fastvae_reparameterize_kl_backward(
    int dtype, int64_t rows, int64_t cols, int64_t samples,
    const void* grad_z, int64_t grad_z_stride, const void* grad_kl, int64_t grad_kl_stride,
    const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    const void* eps, int64_t eps_stride, uint64_t seed,
    void* grad_mu, void* grad_logvar, int num_threads);
int fastvae_gaussian_kl_forward(
    int dtype, int64_t rows, int64_t cols,
    const void* mu, int64_t mu_stride, const void* logvar, int64_t logvar_stride,
    int elementwise, void* kl, void* grad_mu, void* grad_logvar, int num_threads);
""")


def reparameterize_kl_forward(
    mu: Tensor, logvar: Tensor, eps: Tensor | None, seed: Tensor, samples: int = 1
) -> tuple[Tensor, Tensor]:
    """mu, logvar [B, L], eps [K * B, L] (or None: Philox noise from seed) -> z [K * B, L] (mu's dtype), kl [B]."""
    mu = check_rows("mu", mu)
    logvar = check_rows("logvar", logvar, mu.shape)
    rows, cols = mu.shape
    eps = None if eps is None else check_rows("eps", eps, torch.Size((samples * rows, cols)))
    dtype = storage_dtype(mu, logvar, eps)
    m, lv, e = as_dtype(mu, dtype), as_dtype(logvar, dtype), as_dtype(eps, dtype)
    z = torch.empty((samples * rows, cols), dtype=dtype)
    kl = torch.empty(rows, dtype=loss_dtype(mu, logvar))
    library.call(
        "fastvae_reparameterize_kl_forward",
        DTYPE_CODES[dtype],
        rows,
        cols,
        samples,
        m.data_ptr(),
        m.stride(0),
        lv.data_ptr(),
        lv.stride(0),
        pointer(e),
        row_stride(e),
        0 if e is not None else seed_value(seed),
        z.data_ptr(),
        kl.data_ptr(),
        num_threads(),
    )
    return as_dtype(z, mu.dtype), kl


def reparameterize_kl_backward(
    grad_z: Tensor | None,
    grad_kl: Tensor | None,
    mu: Tensor,
    logvar: Tensor,
    eps: Tensor | None,
    seed: Tensor,
    samples: int = 1,
) -> tuple[Tensor, Tensor]:
    """grad_z [K * B, L] | None, grad_kl [B] | None -> grad_mu, grad_logvar [B, L] (mu's, logvar's dtype).

    eps None regenerates the forward noise from seed."""
    mu = check_rows("mu", mu)
    logvar = check_rows("logvar", logvar, mu.shape)
    rows, cols = mu.shape
    sample_rows = torch.Size((samples * rows, cols))
    eps = None if eps is None else check_rows("eps", eps, sample_rows)
    grad_z = None if grad_z is None else check_rows("grad_z", grad_z, sample_rows)
    compute = loss_dtype(mu, logvar)
    if grad_kl is not None:
        if grad_kl.shape != mu.shape[:1]:
            raise ValueError(f"native backend: grad_kl {list(grad_kl.shape)} must have shape [{mu.shape[0]}]")
        # Any element stride, 0 included: the backward of kl.sum() hands over one value expanded.
        if grad_kl.dtype != compute or grad_kl.device.type != "cpu":
            grad_kl = grad_kl.to(device="cpu", dtype=compute)
    dtype = storage_dtype(mu, logvar, eps, grad_z)
    m, lv, e, gz = as_dtype(mu, dtype), as_dtype(logvar, dtype), as_dtype(eps, dtype), as_dtype(grad_z, dtype)
    grad_mu = torch.empty((rows, cols), dtype=dtype)
    grad_logvar = torch.empty((rows, cols), dtype=dtype)
    noise_seed = seed_value(seed) if gz is not None and e is None else 0
    library.call(
        "fastvae_reparameterize_kl_backward",
        DTYPE_CODES[dtype],
        rows,
        cols,
        samples,
        pointer(gz),
        row_stride(gz),
        pointer(grad_kl),
        0 if grad_kl is None else grad_kl.stride(0),
        m.data_ptr(),
        m.stride(0),
        lv.data_ptr(),
        lv.stride(0),
        pointer(e),
        row_stride(e),
        noise_seed,
        grad_mu.data_ptr(),
        grad_logvar.data_ptr(),
        num_threads(),
    )
    return as_dtype(grad_mu, mu.dtype), as_dtype(grad_logvar, logvar.dtype)


def gaussian_kl_forward(
    mu: Tensor, logvar: Tensor, elementwise: bool, compute_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """mu, logvar [B, L] -> kl ([B, L] if elementwise else [B]), dkl/dmu, dkl/dlogvar (or None)."""
    mu = check_rows("mu", mu)
    logvar = check_rows("logvar", logvar, mu.shape)
    dtype = storage_dtype(mu, logvar)
    m, lv = as_dtype(mu, dtype), as_dtype(logvar, dtype)
    rows, cols = mu.shape
    kl = torch.empty((rows, cols) if elementwise else (rows,), dtype=loss_dtype(mu, logvar))
    grad_mu = torch.empty((rows, cols), dtype=dtype) if compute_grad else None
    grad_logvar = torch.empty((rows, cols), dtype=dtype) if compute_grad else None
    library.call(
        "fastvae_gaussian_kl_forward",
        DTYPE_CODES[dtype],
        rows,
        cols,
        m.data_ptr(),
        m.stride(0),
        lv.data_ptr(),
        lv.stride(0),
        int(bool(elementwise)),
        kl.data_ptr(),
        pointer(grad_mu),
        pointer(grad_logvar),
        num_threads(),
    )
    if not compute_grad:
        return kl, None, None
    return kl, as_dtype(grad_mu, mu.dtype), as_dtype(grad_logvar, logvar.dtype)
