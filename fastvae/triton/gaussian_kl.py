"""Triton: KL(N(mu, exp(logvar)) || N(0, I)) per element or per row, with its gradient in the same pass.

kl = 0.5*(mu^2 + exp(logvar) - logvar - 1); dkl/dmu = mu; dkl/dlogvar = 0.5*(exp(logvar) - 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.triton.common import compute_dtype, loss_torch_dtype, tile


@triton.jit
def _gaussian_kl_fwd_kernel(
    mu_ptr, logvar_ptr,  # [B, L] each, row strides below, unit column stride
    kl_ptr,  # [B, L] contiguous if ELEMENTWISE else [B]; float32 (float64)
    dmu_ptr, dlogvar_ptr,  # [B, L] contiguous in mu's / logvar's dtype, written if COMPUTE_GRAD
    B, L, stride_mu, stride_logvar,
    ELEMENTWISE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # int64 offsets: b * stride exceeds 2^31 for large batches of wide rows.
    o_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_b = o_b < B
    b_kl_row = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for l_start in range(0, L, BLOCK_L):
        o_l = l_start + tl.arange(0, BLOCK_L).to(tl.int64)
        m = m_b[:, None] & (o_l < L)[None, :]
        b_mu = tl.load(mu_ptr + o_b[:, None] * stride_mu + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_lv = tl.load(logvar_ptr + o_b[:, None] * stride_logvar + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_var = tl.exp(b_lv)
        b_kl = 0.5 * (b_mu * b_mu + b_var - b_lv - 1.0)
        o_out = o_b[:, None] * L + o_l[None, :]
        if ELEMENTWISE:
            tl.store(kl_ptr + o_out, b_kl, mask=m)
        else:
            b_kl_row += tl.sum(tl.where(m, b_kl, 0.0), axis=1)
        if COMPUTE_GRAD:
            tl.store(dmu_ptr + o_out, b_mu.to(dmu_ptr.dtype.element_ty), mask=m)
            tl.store(dlogvar_ptr + o_out, (0.5 * (b_var - 1.0)).to(dlogvar_ptr.dtype.element_ty), mask=m)
    if not ELEMENTWISE:
        tl.store(kl_ptr + o_b, b_kl_row, mask=m_b)


def gaussian_kl_forward(mu: torch.Tensor, logvar: torch.Tensor, elementwise: bool, compute_grad: bool):
    """mu, logvar [B, L] -> kl ([B, L] or [B]), dkl/dmu | None, dkl/dlogvar | None."""
    B, L = mu.shape
    kl = torch.empty((B, L) if elementwise else (B,), dtype=loss_torch_dtype(mu, logvar), device=mu.device)
    dmu = torch.empty((B, L), dtype=mu.dtype, device=mu.device) if compute_grad else None
    dlogvar = torch.empty((B, L), dtype=logvar.dtype, device=mu.device) if compute_grad else None
    block_b, block_l = tile(B, L)
    _gaussian_kl_fwd_kernel[(triton.cdiv(B, block_b),)](
        mu, logvar, kl, dmu if compute_grad else kl, dlogvar if compute_grad else kl,
        B, L, mu.stride(0), logvar.stride(0),
        ELEMENTWISE=elementwise, COMPUTE_GRAD=compute_grad, COMPUTE=compute_dtype(mu, logvar),
        BLOCK_B=block_b, BLOCK_L=block_l)
    return kl, dmu, dlogvar
