"""Triton: Bernoulli log-likelihood from logits, per element or per row, with its gradient in the same pass.

log p = x*l - softplus(l) = -(max(l, 0) - l*x + log1p(exp(-|l|)));  dlogp/dl = x - sigmoid(l).
Only exp(-|l|) <= 1 is ever formed, so logits of any size stay finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.triton.common import compute_dtype, log1p_small, loss_torch_dtype, tile


@triton.jit
def _bernoulli_fwd_kernel(
    logits_ptr, target_ptr,  # [B, D] each, row strides below, unit column stride
    logp_ptr,  # [B, D] contiguous if ELEMENTWISE else [B]; float32 (float64)
    dlogits_ptr,  # [B, D] contiguous in logits' dtype, written if COMPUTE_GRAD
    B, D, stride_logits, stride_target,
    grad_scale,  # dlogits = grad_scale * dlogp/dlogits
    ELEMENTWISE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # int64 offsets: b * stride exceeds 2^31 for large batches of images.
    o_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_b = o_b < B
    b_logp_row = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for d_start in range(0, D, BLOCK_D):
        o_d = d_start + tl.arange(0, BLOCK_D).to(tl.int64)
        m = m_b[:, None] & (o_d < D)[None, :]
        b_l = tl.load(logits_ptr + o_b[:, None] * stride_logits + o_d[None, :], mask=m, other=0.0).to(COMPUTE)
        b_x = tl.load(target_ptr + o_b[:, None] * stride_target + o_d[None, :], mask=m, other=0.0).to(COMPUTE)
        b_e = tl.exp(-tl.abs(b_l))  # in (0, 1]
        b_logp = b_l * b_x - tl.maximum(b_l, 0.0) - log1p_small(b_e)
        o_out = o_b[:, None] * D + o_d[None, :]
        if ELEMENTWISE:
            tl.store(logp_ptr + o_out, b_logp, mask=m)
        else:
            b_logp_row += tl.sum(tl.where(m, b_logp, 0.0), axis=1)
        if COMPUTE_GRAD:
            # sigmoid(l) from the same e: 1/(1+e) for l >= 0, e/(1+e) for l < 0.
            b_sig = tl.where(b_l >= 0.0, 1.0, b_e) / (1.0 + b_e)
            b_grad = grad_scale * (b_x - b_sig)
            tl.store(dlogits_ptr + o_out, b_grad.to(dlogits_ptr.dtype.element_ty), mask=m)
    if not ELEMENTWISE:
        tl.store(logp_ptr + o_b, b_logp_row, mask=m_b)


def bernoulli_log_likelihood_forward(logits: torch.Tensor, target: torch.Tensor, elementwise: bool,
                                     compute_grad: bool, grad_scale: float = 1.0):
    """logits, target [B, D] -> log p ([B, D] or [B]), grad_scale * dlogp/dlogits | None."""
    B, D = logits.shape
    logp = torch.empty((B, D) if elementwise else (B,), dtype=loss_torch_dtype(logits, target),
                       device=logits.device)
    dlogits = torch.empty((B, D), dtype=logits.dtype, device=logits.device) if compute_grad else None
    block_b, block_d = tile(B, D)
    _bernoulli_fwd_kernel[(triton.cdiv(B, block_b),)](
        logits, target, logp, dlogits if compute_grad else logp,
        B, D, logits.stride(0), target.stride(0), float(grad_scale),
        ELEMENTWISE=elementwise, COMPUTE_GRAD=compute_grad, COMPUTE=compute_dtype(logits, target),
        BLOCK_B=block_b, BLOCK_D=block_d)
    return logp, dlogits
