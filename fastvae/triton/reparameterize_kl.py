"""Triton: z = mu + exp(0.5*logvar)*eps and the per-row KL in one pass; its backward.

Forward reads mu, logvar (and eps if given) once and writes z [B, L] and kl [B].
Backward regenerates eps from the seed instead of reading a stored copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.triton.common import compute_dtype, loss_torch_dtype, philox_normal, tile


@triton.jit(do_not_specialize=["seed"])
def _reparameterize_kl_fwd_kernel(
    mu_ptr, logvar_ptr, eps_ptr,  # [B, L] each, row strides below, unit column stride
    z_ptr,  # [B, L] contiguous, mu's dtype
    kl_ptr,  # [B] float32 (float64 when computing in float64)
    B, L, stride_mu, stride_logvar, stride_eps, seed,
    HAS_EPS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # int64 offsets: b * stride exceeds 2^31 for large batches of wide rows.
    o_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_b = o_b < B
    b_kl = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for l_start in range(0, L, BLOCK_L):
        o_l = l_start + tl.arange(0, BLOCK_L).to(tl.int64)
        m = m_b[:, None] & (o_l < L)[None, :]
        b_mu = tl.load(mu_ptr + o_b[:, None] * stride_mu + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_lv = tl.load(logvar_ptr + o_b[:, None] * stride_logvar + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        if HAS_EPS:
            b_eps = tl.load(eps_ptr + o_b[:, None] * stride_eps + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        else:
            b_eps = philox_normal(seed, o_b[:, None] * L + o_l[None, :], COMPUTE)
        b_std = tl.exp(0.5 * b_lv)
        b_z = b_mu + b_std * b_eps
        tl.store(z_ptr + o_b[:, None] * L + o_l[None, :], b_z.to(z_ptr.dtype.element_ty), mask=m)
        # exp(logvar) = std^2 saves an exp; finite for |logvar| <= 30 in float32.
        b_kl_elem = 0.5 * (b_mu * b_mu + b_std * b_std - b_lv - 1.0)
        b_kl += tl.sum(tl.where(m, b_kl_elem, 0.0), axis=1)
    tl.store(kl_ptr + o_b, b_kl, mask=m_b)


@triton.jit(do_not_specialize=["seed"])
def _reparameterize_kl_bwd_kernel(
    grad_z_ptr,  # [B, L] row stride stride_gz, or unused when not HAS_GRAD_Z
    grad_kl_ptr,  # [B] or unused when not HAS_GRAD_KL
    mu_ptr, logvar_ptr, eps_ptr,  # [B, L] each, row strides below
    grad_mu_ptr, grad_logvar_ptr,  # [B, L] contiguous, in mu's and logvar's dtypes
    B, L, stride_gz, stride_mu, stride_logvar, stride_eps, seed,
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr, HAS_EPS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
):
    o_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_b = o_b < B
    if HAS_GRAD_KL:
        b_gkl = tl.load(grad_kl_ptr + o_b, mask=m_b, other=0.0).to(COMPUTE)[:, None]
    for l_start in range(0, L, BLOCK_L):
        o_l = l_start + tl.arange(0, BLOCK_L).to(tl.int64)
        m = m_b[:, None] & (o_l < L)[None, :]
        b_lv = tl.load(logvar_ptr + o_b[:, None] * stride_logvar + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_std = tl.exp(0.5 * b_lv)
        b_gmu = tl.zeros([BLOCK_B, BLOCK_L], dtype=COMPUTE)
        b_glv = tl.zeros([BLOCK_B, BLOCK_L], dtype=COMPUTE)
        if HAS_GRAD_Z:
            b_gz = tl.load(grad_z_ptr + o_b[:, None] * stride_gz + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
            if HAS_EPS:
                b_eps = tl.load(eps_ptr + o_b[:, None] * stride_eps + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
            else:
                b_eps = philox_normal(seed, o_b[:, None] * L + o_l[None, :], COMPUTE)
            b_gmu += b_gz
            b_glv += b_gz * 0.5 * b_std * b_eps
        if HAS_GRAD_KL:
            b_mu = tl.load(mu_ptr + o_b[:, None] * stride_mu + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
            b_gmu += b_gkl * b_mu
            b_glv += b_gkl * 0.5 * (b_std * b_std - 1.0)
        o_out = o_b[:, None] * L + o_l[None, :]
        tl.store(grad_mu_ptr + o_out, b_gmu.to(grad_mu_ptr.dtype.element_ty), mask=m)
        tl.store(grad_logvar_ptr + o_out, b_glv.to(grad_logvar_ptr.dtype.element_ty), mask=m)


def reparameterize_kl_forward(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None,
                              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mu, logvar, eps [B, L] -> z [B, L] (mu's dtype), kl [B] (float32)."""
    B, L = mu.shape
    z = torch.empty((B, L), dtype=mu.dtype, device=mu.device)
    kl = torch.empty((B,), dtype=loss_torch_dtype(mu, logvar), device=mu.device)
    block_b, block_l = tile(B, L)
    has_eps = eps is not None
    eps_arg = eps if has_eps else mu
    _reparameterize_kl_fwd_kernel[(triton.cdiv(B, block_b),)](
        mu, logvar, eps_arg, z, kl, B, L, mu.stride(0), logvar.stride(0), eps_arg.stride(0), seed,
        HAS_EPS=has_eps, COMPUTE=compute_dtype(mu, logvar), BLOCK_B=block_b, BLOCK_L=block_l)
    return z, kl


def reparameterize_kl_backward(grad_z: torch.Tensor | None, grad_kl: torch.Tensor | None,
                               mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None,
                               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_z [B, L] | None, grad_kl [B] | None -> grad_mu, grad_logvar [B, L]."""
    B, L = mu.shape
    grad_mu = torch.empty((B, L), dtype=mu.dtype, device=mu.device)
    grad_logvar = torch.empty((B, L), dtype=logvar.dtype, device=mu.device)
    block_b, block_l = tile(B, L)
    gz_arg = grad_z if grad_z is not None else mu
    gkl_arg = grad_kl.contiguous() if grad_kl is not None else mu
    eps_arg = eps if eps is not None else mu
    _reparameterize_kl_bwd_kernel[(triton.cdiv(B, block_b),)](
        gz_arg, gkl_arg, mu, logvar, eps_arg, grad_mu, grad_logvar,
        B, L, gz_arg.stride(0), mu.stride(0), logvar.stride(0), eps_arg.stride(0), seed,
        HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None, HAS_EPS=eps is not None,
        COMPUTE=compute_dtype(mu, logvar), BLOCK_B=block_b, BLOCK_L=block_l)
    return grad_mu, grad_logvar
