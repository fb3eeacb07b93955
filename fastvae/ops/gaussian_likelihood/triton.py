"""The Gaussian log-likelihood in Triton, per element or per row, with its gradients in the same pass.

log p = -0.5 * (r^2 + s + log 2pi), r = (x - m) * exp(-s/2);  dlogp/dm = r * exp(-s/2),
dlogp/ds = 0.5 * (r^2 - 1) (reference.py). Mean row b reads target row b % target_rows and
log-variance row b % logvar_rows (row-periodic inputs, see reference.py). Mean and
log-variance share one storage dtype, paired with the target's (common.likelihood_inputs), and
dlogp/dlogvar is written in the dtype reference.logvar_grad_dtype names: the compiled variants
stay few (see specializations()).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastvae.ops.common import LIKELIHOOD_DTYPE_PAIRS, as_dtype, likelihood_inputs, loss_dtype
from fastvae.ops.gaussian_likelihood.reference import logvar_grad_dtype
from fastvae.ops.triton_helpers import Specialization, compute_dtype, launch, tile, tiles


@triton.jit
def _gaussian_likelihood_fwd_kernel(
    mean_ptr,  # [B, D], row stride stride_mean, unit column stride
    target_ptr,  # [target_rows, D], row stride stride_target: mean row b reads target row b % target_rows
    logvar_ptr,  # [logvar_rows, D], row stride stride_logvar, mean row b reads row b % logvar_rows; if HAS_LOGVAR
    logp_ptr,  # [B, D] contiguous if ELEMENTWISE else [B]; in the compute dtype
    dmean_ptr,  # [B, D] contiguous in the mean's storage dtype, written if COMPUTE_GRAD
    dlogvar_ptr,  # [B, D] contiguous, written if COMPUTE_GRAD and HAS_LOGVAR
    B,
    D,
    stride_mean,
    stride_target,
    stride_logvar,
    target_rows,
    logvar_rows,
    weight: tl.float64,  # dmean, dlogvar = weight * dlogp/d(mean, logvar); float64: float32 would round -1/B
    HAS_LOGVAR: tl.constexpr,
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
    o_r = o_b % logvar_rows
    b_logp_row = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for d_start in range(0, D, BLOCK_D):
        o_d = d_start + tl.arange(0, BLOCK_D).to(tl.int64)
        m = m_b[:, None] & (o_d < D)[None, :]
        b_m = tl.load(mean_ptr + o_b[:, None] * stride_mean + o_d[None, :], mask=m, other=0.0).to(COMPUTE)
        b_x = tl.load(target_ptr + o_t[:, None] * stride_target + o_d[None, :], mask=m, other=0.0).to(COMPUTE)
        if HAS_LOGVAR:
            b_s = tl.load(logvar_ptr + o_r[:, None] * stride_logvar + o_d[None, :], mask=m, other=0.0).to(COMPUTE)
            b_inv_std = tl.exp(-0.5 * b_s)
            b_r = (b_x - b_m) * b_inv_std
            b_q = b_r * b_r
            b_logp = -0.5 * (b_q + b_s + 1.8378770664093453)  # log 2pi
        else:
            b_r = b_x - b_m
            b_q = b_r * b_r
            b_logp = -0.5 * (b_q + 1.8378770664093453)
        o_out = o_b[:, None] * D + o_d[None, :]
        if ELEMENTWISE:
            tl.store(logp_ptr + o_out, b_logp, mask=m)
        else:
            b_logp_row += tl.sum(tl.where(m, b_logp, 0.0), axis=1)
        if COMPUTE_GRAD:
            if HAS_LOGVAR:
                b_dlogvar = weight * (0.5 * (b_q - 1.0))
                tl.store(dlogvar_ptr + o_out, b_dlogvar.to(dlogvar_ptr.dtype.element_ty), mask=m)
                b_dmean = weight * (b_r * b_inv_std)
            else:
                b_dmean = weight * b_r
            tl.store(dmean_ptr + o_out, b_dmean.to(dmean_ptr.dtype.element_ty), mask=m)
    if not ELEMENTWISE:
        tl.store(logp_ptr + o_b, b_logp_row, mask=m_b)


def gaussian_likelihood_forward(
    mean: torch.Tensor,
    target: torch.Tensor,
    logvar: torch.Tensor | None,
    elementwise: bool,
    compute_grad: bool,
    weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """mean [B, D], target [T, D], logvar [R, D] | None (T, R divide B) -> log p ([B, D] or [B]),
    weight * dlogp/dmean, weight * dlogp/dlogvar [B, D] (None without compute_grad or logvar)."""
    B, D = mean.shape
    (m, s), x = likelihood_inputs((mean, logvar), target)
    compute = loss_dtype(m)
    device = mean.device
    logp = torch.empty((B, D) if elementwise else (B,), dtype=compute, device=device)
    dmean = torch.empty((B, D), dtype=m.dtype, device=device) if compute_grad else None
    dlogvar = (
        torch.empty((B, D), dtype=logvar_grad_dtype(m, x, s), device=device) if compute_grad and s is not None else None
    )
    block_b, block_d = tile(D)
    launch(
        _gaussian_likelihood_fwd_kernel,
        B,
        m,
        x,
        m if s is None else s,
        logp,
        logp if dmean is None else dmean,
        logp if dlogvar is None else dlogvar,
        B,
        D,
        m.stride(0),
        x.stride(0),
        0 if s is None else s.stride(0),
        x.shape[0],
        1 if s is None else s.shape[0],
        float(weight),
        HAS_LOGVAR=s is not None,
        ELEMENTWISE=elementwise,
        COMPUTE_GRAD=compute_grad,
        COMPUTE=compute_dtype(m),
        BLOCK_B=block_b,
        BLOCK_D=block_d,
    )
    if dlogvar is not None:
        dlogvar = as_dtype(dlogvar, logvar_grad_dtype(mean, target, logvar))
    return logp, as_dtype(dmean, mean.dtype), dlogvar


def specializations() -> list[Specialization]:
    """Every compiled form the launcher above can request."""
    out = []
    for (param, target), (block_b, block_d) in itertools.product(LIKELIHOOD_DTYPE_PAIRS, tiles()):
        loss = torch.float64 if param == torch.float64 else torch.float32
        for has_logvar, elementwise, grad in itertools.product((False, True), repeat=3):
            # dlogvar: the param dtype for a log-variance row per mean row, the compute dtype for fewer.
            for dlogvar in dict.fromkeys((param, loss) if has_logvar and grad else (loss,)):
                pointers = {
                    "mean_ptr": param,
                    "target_ptr": target,
                    "logvar_ptr": param,
                    "logp_ptr": loss,
                    "dmean_ptr": param if grad else loss,
                    "dlogvar_ptr": dlogvar,
                }
                out.append(
                    Specialization(
                        _gaussian_likelihood_fwd_kernel,
                        pointers,
                        {
                            "HAS_LOGVAR": has_logvar,
                            "ELEMENTWISE": elementwise,
                            "COMPUTE_GRAD": grad,
                            "COMPUTE": compute_dtype(torch.empty(0, dtype=param)),
                            "BLOCK_B": block_b,
                            "BLOCK_D": block_d,
                        },
                        floats=("weight",),
                    )
                )
    return out
