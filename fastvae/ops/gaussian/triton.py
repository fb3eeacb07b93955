"""The Gaussian posterior in Triton: z and the per-row KL in one pass, its backward, and the KL alone.

Forward reads mu, logvar (and eps if given) once and writes z [B, L] and kl [B].
Backward regenerates eps from the seed instead of reading a stored copy.
With K samples per row, z (and eps, grad_z) have K * B rows: z row r = k * B + b reads
mu, logvar row r % B (a row period, no K-fold copy) and the noise at flat index r * L + j;
backward loops over the K samples of each row in registers and writes grad_mu, grad_logvar
once. The seed is a
0-d int64 tensor read through a pointer, so the kernel never needs it on the host and a
CUDA graph replays with the seed drawn for that replay (see fastvae.ops.noise).
Inputs of one kernel share one storage dtype (mixes are upcast first, see storage_dtype).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastvae.ops.common import as_dtype, loss_dtype, storage_dtype
from fastvae.ops.triton_helpers import (
    STORAGE_DTYPES,
    Specialization,
    compute_dtype,
    launch,
    philox_normal,
    tile,
    tiles,
)


@triton.jit
def _reparameterize_kl_fwd_kernel(
    mu_ptr,
    logvar_ptr,  # [B, L] each, row strides below, unit column stride
    eps_ptr,  # [K * B, L], row stride below
    seed_ptr,  # [] int64, read when not HAS_EPS
    z_ptr,  # [K * B, L] contiguous
    kl_ptr,  # [B] in the compute dtype
    B,
    L,
    rows_z,  # rows_z = K * B: the programs cover z's rows
    stride_mu,
    stride_logvar,
    stride_eps,
    HAS_EPS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # int64 offsets: r * stride exceeds 2^31 for large batches of wide rows.
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_r = o_r < rows_z
    o_b = o_r % B  # the posterior row that z row r samples
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    b_kl = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for l_start in range(0, L, BLOCK_L):
        o_l = l_start + tl.arange(0, BLOCK_L).to(tl.int64)
        m = m_r[:, None] & (o_l < L)[None, :]
        b_mu = tl.load(mu_ptr + o_b[:, None] * stride_mu + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_lv = tl.load(logvar_ptr + o_b[:, None] * stride_logvar + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        if HAS_EPS:
            b_eps = tl.load(eps_ptr + o_r[:, None] * stride_eps + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        else:
            b_eps = philox_normal(seed, o_r[:, None] * L + o_l[None, :], COMPUTE)
        b_std = tl.exp(0.5 * b_lv)
        b_z = b_mu + b_std * b_eps
        tl.store(z_ptr + o_r[:, None] * L + o_l[None, :], b_z.to(z_ptr.dtype.element_ty), mask=m)
        b_kl_elem = 0.5 * (b_mu * b_mu + _expm1_minus_x(b_lv))
        b_kl += tl.sum(tl.where(m, b_kl_elem, 0.0), axis=1)
    # The first sample's rows (r < B) write the KL, which does not depend on the sample.
    tl.store(kl_ptr + o_b, b_kl, mask=m_r & (o_r < B))


@triton.jit
def _series_after_x(x):
    """(exp(x) - 1 - x) / x^2 = 1/2 + x/6 + ... + x^16/18!, the Taylor series behind _expm1 and
    _expm1_minus_x (truncation below 1e-19 relative for |x| < 1/2: enough for float64)."""
    p = 1.0 / 355687428096000.0 + x * (1.0 / 6402373705728000.0)
    p = 1.0 / 1307674368000.0 + x * (1.0 / 20922789888000.0 + x * p)
    p = 1.0 / 6227020800.0 + x * (1.0 / 87178291200.0 + x * p)
    p = 1.0 / 39916800.0 + x * (1.0 / 479001600.0 + x * p)
    p = 1.0 / 362880.0 + x * (1.0 / 3628800.0 + x * p)
    p = 1.0 / 5040.0 + x * (1.0 / 40320.0 + x * p)
    p = 1.0 / 120.0 + x * (1.0 / 720.0 + x * p)
    p = 1.0 / 6.0 + x * (1.0 / 24.0 + x * p)
    return 0.5 + x * p


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0: the series below |x| = 1/2, exp(x) - 1 above."""
    return tl.where(tl.abs(x) < 0.5, x + x * x * _series_after_x(x), tl.exp(x) - 1.0)


@triton.jit
def _expm1_minus_x(x):
    """exp(x) - 1 - x, the KL's exp(logvar) - 1 - logvar, about x^2 / 2 near 0 where expm1(x) - x
    would cancel to noise."""
    return tl.where(tl.abs(x) < 0.5, x * x * _series_after_x(x), tl.exp(x) - 1.0 - x)


@triton.jit
def _reparameterize_kl_bwd_kernel(
    grad_z_ptr,  # [K * B, L] row stride stride_gz, read if HAS_GRAD_Z
    grad_kl_ptr,  # [B] in the compute dtype, element stride stride_gkl (0: one value broadcast), if HAS_GRAD_KL
    mu_ptr,
    logvar_ptr,  # [B, L] each, row strides below
    eps_ptr,  # [K * B, L], row stride below
    seed_ptr,  # [] int64, read when HAS_GRAD_Z and not HAS_EPS
    grad_mu_ptr,
    grad_logvar_ptr,  # [B, L] contiguous
    B,
    L,
    K,
    stride_gz,
    stride_gkl,
    stride_mu,
    stride_logvar,
    stride_eps,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_KL: tl.constexpr,
    HAS_EPS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    o_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_b = o_b < B
    if HAS_GRAD_KL:
        b_gkl = tl.load(grad_kl_ptr + o_b * stride_gkl, mask=m_b, other=0.0).to(COMPUTE)[:, None]
    if HAS_GRAD_Z and not HAS_EPS:
        seed = tl.load(seed_ptr)
    for l_start in range(0, L, BLOCK_L):
        o_l = l_start + tl.arange(0, BLOCK_L).to(tl.int64)
        m = m_b[:, None] & (o_l < L)[None, :]
        b_lv = tl.load(logvar_ptr + o_b[:, None] * stride_logvar + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_gmu = tl.zeros([BLOCK_B, BLOCK_L], dtype=COMPUTE)
        b_glv = tl.zeros([BLOCK_B, BLOCK_L], dtype=COMPUTE)
        if HAS_GRAD_Z:
            # sum_k grad_z and sum_k grad_z * eps over the K samples of these rows, in registers.
            b_sum_g_eps = tl.zeros([BLOCK_B, BLOCK_L], dtype=COMPUTE)
            o_r = o_b  # row k * B + b of grad_z and eps, stepped by B (int64, no k * B product)
            for _ in range(0, K):
                b_gz = tl.load(grad_z_ptr + o_r[:, None] * stride_gz + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
                if HAS_EPS:
                    b_eps = tl.load(eps_ptr + o_r[:, None] * stride_eps + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
                else:
                    b_eps = philox_normal(seed, o_r[:, None] * L + o_l[None, :], COMPUTE)
                b_gmu += b_gz
                b_sum_g_eps += b_gz * b_eps
                o_r += B
            b_glv += 0.5 * tl.exp(0.5 * b_lv) * b_sum_g_eps
        if HAS_GRAD_KL:
            # Added only when grad_kl exists: 0 * expm1(logvar) would be NaN for logvar = +inf.
            b_mu = tl.load(mu_ptr + o_b[:, None] * stride_mu + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
            b_gmu += b_gkl * b_mu
            b_glv += b_gkl * 0.5 * _expm1(b_lv)
        o_out = o_b[:, None] * L + o_l[None, :]
        tl.store(grad_mu_ptr + o_out, b_gmu.to(grad_mu_ptr.dtype.element_ty), mask=m)
        tl.store(grad_logvar_ptr + o_out, b_glv.to(grad_logvar_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gaussian_kl_fwd_kernel(
    mu_ptr,
    logvar_ptr,  # [B, L] each, row strides below, unit column stride
    kl_ptr,  # [B, L] contiguous if ELEMENTWISE else [B]; in the compute dtype
    dmu_ptr,
    dlogvar_ptr,  # [B, L] contiguous, written if COMPUTE_GRAD
    B,
    L,
    stride_mu,
    stride_logvar,
    ELEMENTWISE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    o_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_b = o_b < B
    b_kl_row = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for l_start in range(0, L, BLOCK_L):
        o_l = l_start + tl.arange(0, BLOCK_L).to(tl.int64)
        m = m_b[:, None] & (o_l < L)[None, :]
        b_mu = tl.load(mu_ptr + o_b[:, None] * stride_mu + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_lv = tl.load(logvar_ptr + o_b[:, None] * stride_logvar + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_em1 = _expm1(b_lv)
        b_kl = 0.5 * (b_mu * b_mu + _expm1_minus_x(b_lv))
        o_out = o_b[:, None] * L + o_l[None, :]
        if ELEMENTWISE:
            tl.store(kl_ptr + o_out, b_kl, mask=m)
        else:
            b_kl_row += tl.sum(tl.where(m, b_kl, 0.0), axis=1)
        if COMPUTE_GRAD:
            tl.store(dmu_ptr + o_out, b_mu.to(dmu_ptr.dtype.element_ty), mask=m)
            tl.store(dlogvar_ptr + o_out, (0.5 * b_em1).to(dlogvar_ptr.dtype.element_ty), mask=m)
    if not ELEMENTWISE:
        tl.store(kl_ptr + o_b, b_kl_row, mask=m_b)


def reparameterize_kl_forward(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, seed: torch.Tensor, samples: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """mu, logvar [B, L], eps [K * B, L] -> z [K * B, L] (mu's dtype), kl [B]."""
    B, L = mu.shape
    dtype = storage_dtype(mu, logvar, eps)
    m, lv, e = as_dtype(mu, dtype), as_dtype(logvar, dtype), as_dtype(eps, dtype)
    z = torch.empty((samples * B, L), dtype=dtype, device=mu.device)
    kl = torch.empty((B,), dtype=loss_dtype(mu, logvar), device=mu.device)
    block_b, block_l = tile(L)
    e_arg = e if e is not None else m
    launch(
        _reparameterize_kl_fwd_kernel,
        samples * B,
        m,
        lv,
        e_arg,
        seed,
        z,
        kl,
        B,
        L,
        samples * B,
        m.stride(0),
        lv.stride(0),
        e_arg.stride(0),
        HAS_EPS=e is not None,
        COMPUTE=compute_dtype(m),
        BLOCK_B=block_b,
        BLOCK_L=block_l,
    )
    return as_dtype(z, mu.dtype), kl


def reparameterize_kl_backward(
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor | None,
    seed: torch.Tensor,
    samples: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_z [K * B, L] | None, grad_kl [B] | None -> grad_mu, grad_logvar [B, L] (mu's, logvar's dtype)."""
    B, L = mu.shape
    dtype = storage_dtype(mu, logvar, eps, grad_z)
    m, lv, e, gz = as_dtype(mu, dtype), as_dtype(logvar, dtype), as_dtype(eps, dtype), as_dtype(grad_z, dtype)
    gkl = as_dtype(grad_kl, loss_dtype(m))
    grad_mu = torch.empty((B, L), dtype=dtype, device=mu.device)
    grad_logvar = torch.empty((B, L), dtype=dtype, device=mu.device)
    block_b, block_l = tile(L)
    gz_arg, gkl_arg, e_arg = (t if t is not None else m for t in (gz, gkl, e))
    launch(
        _reparameterize_kl_bwd_kernel,
        B,
        gz_arg,
        gkl_arg,
        m,
        lv,
        e_arg,
        seed,
        grad_mu,
        grad_logvar,
        B,
        L,
        samples,
        gz_arg.stride(0),
        gkl_arg.stride(0),
        m.stride(0),
        lv.stride(0),
        e_arg.stride(0),
        HAS_GRAD_Z=gz is not None,
        HAS_GRAD_KL=gkl is not None,
        HAS_EPS=gz is not None and e is not None,
        COMPUTE=compute_dtype(m),
        BLOCK_B=block_b,
        BLOCK_L=block_l,
    )
    return as_dtype(grad_mu, mu.dtype), as_dtype(grad_logvar, logvar.dtype)


def gaussian_kl_forward(
    mu: torch.Tensor, logvar: torch.Tensor, elementwise: bool, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """mu, logvar [B, L] -> kl ([B, L] or [B]), dkl/dmu | None, dkl/dlogvar | None."""
    B, L = mu.shape
    dtype = storage_dtype(mu, logvar)
    m, lv = as_dtype(mu, dtype), as_dtype(logvar, dtype)
    kl = torch.empty((B, L) if elementwise else (B,), dtype=loss_dtype(m), device=mu.device)
    dmu = torch.empty((B, L), dtype=dtype, device=mu.device) if compute_grad else None
    dlogvar = torch.empty((B, L), dtype=dtype, device=mu.device) if compute_grad else None
    block_b, block_l = tile(L)
    launch(
        _gaussian_kl_fwd_kernel,
        B,
        m,
        lv,
        kl,
        dmu if compute_grad else kl,
        dlogvar if compute_grad else kl,
        B,
        L,
        m.stride(0),
        lv.stride(0),
        ELEMENTWISE=elementwise,
        COMPUTE_GRAD=compute_grad,
        COMPUTE=compute_dtype(m),
        BLOCK_B=block_b,
        BLOCK_L=block_l,
    )
    if not compute_grad:
        return kl, None, None
    return kl, as_dtype(dmu, mu.dtype), as_dtype(dlogvar, logvar.dtype)


def specializations() -> list[Specialization]:
    """Every compiled form the launchers above can request."""
    out = []
    for dtype, (block_b, block_l) in itertools.product(STORAGE_DTYPES, tiles()):
        loss = torch.float64 if dtype == torch.float64 else torch.float32
        compute = compute_dtype(torch.empty(0, dtype=dtype))
        tile_args = {"COMPUTE": compute, "BLOCK_B": block_b, "BLOCK_L": block_l}
        tensors = {"mu_ptr": dtype, "logvar_ptr": dtype, "eps_ptr": dtype, "seed_ptr": torch.int64}
        for has_eps in (False, True):
            out.append(
                Specialization(
                    _reparameterize_kl_fwd_kernel,
                    {**tensors, "z_ptr": dtype, "kl_ptr": loss},
                    {"HAS_EPS": has_eps, **tile_args},
                )
            )
        for has_gz, has_gkl, has_eps in ((1, 1, 0), (1, 1, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0)):
            pointers = {
                "grad_z_ptr": dtype,
                "grad_kl_ptr": loss,
                **tensors,
                "grad_mu_ptr": dtype,
                "grad_logvar_ptr": dtype,
            }
            out.append(
                Specialization(
                    _reparameterize_kl_bwd_kernel,
                    pointers,
                    {"HAS_GRAD_Z": bool(has_gz), "HAS_GRAD_KL": bool(has_gkl), "HAS_EPS": bool(has_eps), **tile_args},
                )
            )
        for elementwise, grad in itertools.product((False, True), repeat=2):
            pointers = {
                "mu_ptr": dtype,
                "logvar_ptr": dtype,
                "kl_ptr": loss,
                "dmu_ptr": dtype if grad else loss,
                "dlogvar_ptr": dtype if grad else loss,
            }
            out.append(
                Specialization(
                    _gaussian_kl_fwd_kernel, pointers, {"ELEMENTWISE": elementwise, "COMPUTE_GRAD": grad, **tile_args}
                )
            )
    return out
