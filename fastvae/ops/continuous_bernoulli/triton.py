"""The continuous Bernoulli log-likelihood in Triton, per element or per row, with its gradient in the same pass.

The formulas and their two branches (a series for |l| < 1, closed forms beyond) are derived in
reference.py; both branches are computed and one is selected, with each branch's argument
patched where it is unused so that no lane divides by zero or overflows. A target outside
[0, 1] makes its element NaN, value and gradient. Logits row b is scored against target row
b % target_rows (a row-periodic target, see reference.py). Logits and target are read in the
dtypes of common.likelihood_inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.ops.triton_helpers import Specialization, launch_logits_likelihood, logits_likelihood_specializations


@triton.jit
def _h_over_p(p):
    """h(l) / l^2 for p = l^2 < 1: reference.H_SERIES by Horner's rule."""
    q = -2.5040921947091955e-19
    q = 1.087434349279031e-17 + p * q
    q = -4.770034475709914e-16 + p * q
    q = 2.1185501852016142e-14 + p * q
    q = -9.55895466477477e-13 + p * q
    q = 4.403491782239578e-11 + p * q
    q = -2.08767569878681e-09 + p * q
    q = 1.033399470899471e-07 + p * q
    q = -5.5114638447971785e-06 + p * q
    q = 0.00034722222222222224 + p * q
    return -0.041666666666666664 + p * q


@triton.jit
def _h_prime_over_l(p):
    """h'(l) / l for p = l^2 < 1: reference.H_PRIME_SERIES by Horner's rule."""
    q = -5.5090028283602295e-18
    q = 2.174868698558062e-16 + p * q
    q = -8.586062056277845e-15 + p * q
    q = 3.3896802963225827e-13 + p * q
    q = -1.3382536530684679e-11 + p * q
    q = 5.284190138687493e-10 + p * q
    q = -2.08767569878681e-08 + p * q
    q = 8.267195767195768e-07 + p * q
    q = -3.306878306878307e-05 + p * q
    q = 0.001388888888888889 + p * q
    return -0.08333333333333333 + p * q


@triton.jit
def _continuous_bernoulli_fwd_kernel(
    logits_ptr,  # [B, D], row stride stride_logits, unit column stride
    target_ptr,  # [target_rows, D], row stride stride_target: logits row b reads target row b % target_rows
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
        b_a = tl.abs(b_l)
        b_small = b_a < 1.0  # reference.SERIES_BELOW
        b_l_series = tl.where(b_small, b_l, 0.0)
        b_p = b_l_series * b_l_series
        b_a_closed = tl.where(b_small, 1.0, b_a)
        b_e = tl.exp(-b_a_closed)
        b_one_minus_e = 1.0 - b_e  # >= 1 - exp(-1): no cancellation
        b_series = (b_x - 0.5) * b_l + b_p * _h_over_p(b_p)
        b_closed = b_x * b_l - tl.maximum(b_l, 0.0) + tl.log(b_a_closed / b_one_minus_e)
        b_logp = tl.where(b_valid, tl.where(b_small, b_series, b_closed), float("nan"))
        o_out = o_b[:, None] * D + o_d[None, :]
        if ELEMENTWISE:
            tl.store(logp_ptr + o_out, b_logp, mask=m)
        else:
            b_logp_row += tl.sum(tl.where(m, b_logp, 0.0), axis=1)
        if COMPUTE_GRAD:
            b_grad_series = (b_x - 0.5) + b_l_series * _h_prime_over_l(b_p)
            # sign(l) * (1/a - e / (1 - e)) over one division
            b_tail = (b_one_minus_e - b_a_closed * b_e) / (b_a_closed * b_one_minus_e)
            b_grad_closed = b_x + tl.where(b_l > 0.0, b_tail - 1.0, -b_tail)
            b_grad = tl.where(b_valid, weight * tl.where(b_small, b_grad_series, b_grad_closed), float("nan"))
            tl.store(dlogits_ptr + o_out, b_grad.to(dlogits_ptr.dtype.element_ty), mask=m)
    if not ELEMENTWISE:
        tl.store(logp_ptr + o_b, b_logp_row, mask=m_b)


def continuous_bernoulli_forward(
    logits: torch.Tensor, target: torch.Tensor, elementwise: bool, compute_grad: bool, weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, D], target [T, D] (T divides B) -> log p ([B, D] or [B]), weight * dlogp/dlogits | None."""
    return launch_logits_likelihood(_continuous_bernoulli_fwd_kernel, logits, target, elementwise, compute_grad, weight)


def specializations() -> list[Specialization]:
    """Every compiled form the launcher above can request."""
    return logits_likelihood_specializations(_continuous_bernoulli_fwd_kernel)
