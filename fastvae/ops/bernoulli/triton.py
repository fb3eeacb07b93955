"""The Bernoulli log-likelihood in Triton, per element or per row, with its gradient in the same pass.

log p = x*l - softplus(l) = -(max(l, 0) - l*x + log1p(exp(-|l|)));  dlogp/dl = x - sigmoid(l).
Only exp(-|l|) <= 1 is ever formed, so logits of any size stay finite. A target outside
[0, 1] makes its element NaN, value and gradient (see reference.py).
The target may have fewer rows than the logits (T dividing B): logits row r is scored
against target row r % T, so K decoder samples read the data without a K-fold copy.
Logits and target are read in the dtypes of common.likelihood_inputs (bf16 logits from an AMP
decoder against fp32 data without a copy; the compiled variants stay few, see specializations()).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.ops.triton_helpers import (
    Specialization,
    launch_logits_likelihood,
    log1p_small,
    logits_likelihood_specializations,
)


@triton.jit
def _bernoulli_fwd_kernel(
    logits_ptr,  # [B, D], row stride below, unit column stride
    target_ptr,  # [T, D], T dividing B: logits row b reads target row b % T
    logp_ptr,  # [B, D] contiguous if ELEMENTWISE else [B]; in the compute dtype
    dlogits_ptr,  # [B, D] contiguous in logits' dtype, written if COMPUTE_GRAD
    B,
    D,
    target_rows,
    stride_logits,
    stride_target,
    weight: tl.float64,  # dlogits = weight * dlogp/dlogits; float64: a float32 argument would round -1/B
    ELEMENTWISE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    weight = tl.full((), weight, COMPUTE)  # a Python float in the interpreter: made COMPUTE directly
    # int64 offsets: b * stride exceeds 2^31 for large batches of images.
    o_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_b = o_b < B
    o_t = o_b % target_rows
    b_logp_row = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for d_start in range(0, D, BLOCK_D):
        o_d = d_start + tl.arange(0, BLOCK_D).to(tl.int64)
        m = m_b[:, None] & (o_d < D)[None, :]
        b_l = tl.load(logits_ptr + o_b[:, None] * stride_logits + o_d[None, :], mask=m, other=0.0).to(COMPUTE)
        b_x = tl.load(target_ptr + o_t[:, None] * stride_target + o_d[None, :], mask=m, other=0.0).to(COMPUTE)
        b_valid = (b_x >= 0.0) & (b_x <= 1.0)
        b_e = tl.exp(-tl.abs(b_l))  # in (0, 1]
        b_logp = tl.where(b_valid, b_l * b_x - tl.maximum(b_l, 0.0) - log1p_small(b_e), float("nan"))
        o_out = o_b[:, None] * D + o_d[None, :]
        if ELEMENTWISE:
            tl.store(logp_ptr + o_out, b_logp, mask=m)
        else:
            b_logp_row += tl.sum(tl.where(m, b_logp, 0.0), axis=1)
        if COMPUTE_GRAD:
            # sigmoid(l) from the same e: 1/(1+e) for l >= 0, e/(1+e) for l < 0.
            b_sig = tl.where(b_l >= 0.0, 1.0, b_e) / (1.0 + b_e)
            b_grad = tl.where(b_valid, weight * (b_x - b_sig), float("nan"))
            tl.store(dlogits_ptr + o_out, b_grad.to(dlogits_ptr.dtype.element_ty), mask=m)
    if not ELEMENTWISE:
        tl.store(logp_ptr + o_b, b_logp_row, mask=m_b)


def bernoulli_forward(
    logits: torch.Tensor, target: torch.Tensor, elementwise: bool, compute_grad: bool, weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, D], target [T, D] (T dividing B) -> log p ([B, D] or [B]), weight * dlogp/dlogits | None."""
    return launch_logits_likelihood(_bernoulli_fwd_kernel, logits, target, elementwise, compute_grad, weight)


def specializations() -> list[Specialization]:
    """Every compiled form the launcher above can request."""
    return logits_likelihood_specializations(_bernoulli_fwd_kernel)
