"""The importance-weighted bound's latent terms and weights in Triton, and their backward.

A program takes BLOCK_B datapoints with all their K samples (z row k * B + b reads mu and
logvar row b: a row period, no K-fold copy), so the sums over the samples stay in registers:
forward keeps a running logsumexp of log w over k and writes log w into the weights buffer,
then turns it into the normalized weights; backward sums each row's K samples into grad_mu and
grad_logvar. The formulas are in reference.py. z, mu and logvar share one storage dtype (mixes
are upcast first, see storage_dtype); log p, the loss, the weights and grad_rows are in the
compute dtype.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fastvae.ops.common import as_dtype, loss_dtype, storage_dtype
from fastvae.ops.triton_helpers import STORAGE_DTYPES, Specialization, compute_dtype, launch, tile, tiles


@triton.jit
def _iwae_fwd_kernel(
    logp_ptr,  # [K * B] in the compute dtype
    z_ptr,  # [K * B, L], row stride below, unit column stride
    mu_ptr,
    logvar_ptr,  # [B, L] each, row strides below
    loss_ptr,  # [B] in the compute dtype
    weights_ptr,  # [K * B] in the compute dtype: log w after the first loop over k, w~ after the second
    K,
    B,
    L,
    stride_z,
    stride_mu,
    stride_logvar,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    o_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_b = o_b < B
    b_logvar_sum = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for l_start in range(0, L, BLOCK_L):
        o_l = l_start + tl.arange(0, BLOCK_L).to(tl.int64)
        m = m_b[:, None] & (o_l < L)[None, :]
        b_lv = tl.load(logvar_ptr + o_b[:, None] * stride_logvar + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_logvar_sum += tl.sum(b_lv, axis=1)
    # A running logsumexp over the samples: the largest log w so far and the sum of exp(log w - it).
    b_top = tl.full([BLOCK_B], float("-inf"), dtype=COMPUTE)
    b_total = tl.zeros([BLOCK_B], dtype=COMPUTE)
    o_r = o_b  # row k * B + b, stepped by B (int64, no k * B product)
    for _ in range(0, K):
        b_a = tl.zeros([BLOCK_B], dtype=COMPUTE)
        for l_start in range(0, L, BLOCK_L):
            o_l = l_start + tl.arange(0, BLOCK_L).to(tl.int64)
            m = m_b[:, None] & (o_l < L)[None, :]
            b_mu = tl.load(mu_ptr + o_b[:, None] * stride_mu + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
            b_lv = tl.load(logvar_ptr + o_b[:, None] * stride_logvar + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
            b_z = tl.load(z_ptr + o_r[:, None] * stride_z + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
            b_d = b_z - b_mu
            b_a += tl.sum(tl.where(m, b_d * b_d * tl.exp(-b_lv) - b_z * b_z, 0.0), axis=1)
        b_log_w = tl.load(logp_ptr + o_r, mask=m_b, other=0.0).to(COMPUTE) + 0.5 * (b_a + b_logvar_sum)
        tl.store(weights_ptr + o_r, b_log_w, mask=m_b)
        b_new_top = tl.maximum(b_top, b_log_w)
        # Guards for -inf: exp(-inf - -inf) would be NaN where nothing has weight yet.
        b_rescale = tl.where(b_top == b_new_top, 1.0, tl.exp(b_top - b_new_top))
        b_term = tl.where(b_log_w == float("-inf"), 0.0, tl.exp(b_log_w - b_new_top))
        b_total = b_total * b_rescale + b_term
        b_top = b_new_top
        o_r += B
    b_lse = tl.where(b_top == float("-inf"), b_top, b_top + tl.log(b_total))
    # log K in the compute dtype (a float argument would arrive as float32).
    b_log_k = tl.log(tl.zeros([BLOCK_B], dtype=COMPUTE) + K)
    tl.store(loss_ptr + o_b, b_log_k - b_lse, mask=m_b)
    # Every thread reads back log w stored by the loop above, whichever thread stored it.
    tl.debug_barrier()
    o_r = o_b
    for _ in range(0, K):
        b_log_w = tl.load(weights_ptr + o_r, mask=m_b, other=0.0)
        tl.store(weights_ptr + o_r, tl.exp(b_log_w - b_lse), mask=m_b)
        o_r += B


@triton.jit
def _iwae_bwd_kernel(
    grad_rows_ptr,  # [B] in the compute dtype, element stride stride_grad_rows (0: one value broadcast)
    weights_ptr,  # [K * B] in the compute dtype
    z_ptr,  # [K * B, L], row stride below
    mu_ptr,
    logvar_ptr,  # [B, L] each, row strides below
    grad_z_ptr,  # [K * B, L] contiguous
    grad_mu_ptr,
    grad_logvar_ptr,  # [B, L] contiguous; zero for DREG
    K,
    B,
    L,
    stride_grad_rows,
    stride_z,
    stride_mu,
    stride_logvar,
    DREG: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    o_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    m_b = o_b < B
    b_g = tl.load(grad_rows_ptr + o_b * stride_grad_rows, mask=m_b, other=0.0).to(COMPUTE)
    for l_start in range(0, L, BLOCK_L):
        o_l = l_start + tl.arange(0, BLOCK_L).to(tl.int64)
        m = m_b[:, None] & (o_l < L)[None, :]
        b_mu = tl.load(mu_ptr + o_b[:, None] * stride_mu + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_lv = tl.load(logvar_ptr + o_b[:, None] * stride_logvar + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
        b_inv_var = tl.exp(-b_lv)
        b_sum_mu = tl.zeros([BLOCK_B, BLOCK_L], dtype=COMPUTE)
        b_sum_lv = tl.zeros([BLOCK_B, BLOCK_L], dtype=COMPUTE)
        b_coef_sum = tl.zeros([BLOCK_B], dtype=COMPUTE)
        o_r = o_b  # row k * B + b, stepped by B
        for _ in range(0, K):
            b_w = tl.load(weights_ptr + o_r, mask=m_b, other=0.0).to(COMPUTE)
            b_coef = -b_g * b_w
            b_z = tl.load(z_ptr + o_r[:, None] * stride_z + o_l[None, :], mask=m, other=0.0).to(COMPUTE)
            b_d = b_z - b_mu
            b_scaled = b_d * b_inv_var  # (z - mu) / var
            b_grad_z = b_coef[:, None] * (b_scaled - b_z)
            tl.store(grad_z_ptr + o_r[:, None] * L + o_l[None, :], b_grad_z.to(grad_z_ptr.dtype.element_ty), mask=m)
            if not DREG:
                b_sum_mu += b_coef[:, None] * b_scaled
                b_sum_lv += b_coef[:, None] * b_scaled * b_d
                b_coef_sum += b_coef
            o_r += B
        o_out = o_b[:, None] * L + o_l[None, :]
        if DREG:  # the score function is stopped: mu and logvar get their gradient through z only
            b_grad_mu = tl.zeros([BLOCK_B, BLOCK_L], dtype=COMPUTE)
            b_grad_lv = tl.zeros([BLOCK_B, BLOCK_L], dtype=COMPUTE)
        else:
            b_grad_mu = -b_sum_mu
            b_grad_lv = 0.5 * (b_coef_sum[:, None] - b_sum_lv)
        tl.store(grad_mu_ptr + o_out, b_grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=m)
        tl.store(grad_logvar_ptr + o_out, b_grad_lv.to(grad_logvar_ptr.dtype.element_ty), mask=m)


def _latent(per_sample: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    """z, mu, logvar in their one storage dtype (float64 when the [K, B] tensor is) and that dtype's
    compute dtype."""
    dtype = torch.float64 if per_sample.dtype == torch.float64 else storage_dtype(z, mu, logvar)
    z, mu, logvar = as_dtype(z, dtype), as_dtype(mu, dtype), as_dtype(logvar, dtype)
    return z, mu, logvar, loss_dtype(z)


def iwae_forward(
    logp: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p [K, B], z [K * B, L], mu and logvar [B, L] -> the loss rows [B] and the normalized
    weights [K, B], in the compute dtype."""
    samples, rows = logp.shape
    z, mu, logvar, compute = _latent(logp, z, mu, logvar)
    logp = as_dtype(logp, compute).contiguous()
    loss = torch.empty(rows, dtype=compute, device=z.device)
    weights = torch.empty((samples, rows), dtype=compute, device=z.device)
    block_b, block_l = tile(mu.shape[1])
    launch(
        _iwae_fwd_kernel,
        rows,
        logp,
        z,
        mu,
        logvar,
        loss,
        weights,
        samples,
        rows,
        mu.shape[1],
        z.stride(0),
        mu.stride(0),
        logvar.stride(0),
        COMPUTE=compute_dtype(z),
        BLOCK_B=block_b,
        BLOCK_L=block_l,
    )
    return loss, weights


def iwae_backward(
    grad_rows: torch.Tensor, weights: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dreg: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_rows [B], weights [K, B] -> grad_z [K * B, L], grad_mu and grad_logvar [B, L] (zero for
    DReG), in z's, mu's and logvar's dtypes."""
    samples, rows = weights.shape
    dtypes = (z.dtype, mu.dtype, logvar.dtype)
    z, mu, logvar, compute = _latent(weights, z, mu, logvar)
    grad_rows = as_dtype(grad_rows, compute)
    weights = as_dtype(weights, compute).contiguous()
    grad_z = torch.empty((samples * rows, mu.shape[1]), dtype=z.dtype, device=z.device)
    grad_mu = torch.empty(mu.shape, dtype=z.dtype, device=z.device)
    grad_logvar = torch.empty(mu.shape, dtype=z.dtype, device=z.device)
    block_b, block_l = tile(mu.shape[1])
    launch(
        _iwae_bwd_kernel,
        rows,
        grad_rows,
        weights,
        z,
        mu,
        logvar,
        grad_z,
        grad_mu,
        grad_logvar,
        samples,
        rows,
        mu.shape[1],
        grad_rows.stride(0),
        z.stride(0),
        mu.stride(0),
        logvar.stride(0),
        DREG=bool(dreg),
        COMPUTE=compute_dtype(z),
        BLOCK_B=block_b,
        BLOCK_L=block_l,
    )
    return tuple(as_dtype(t, dtype) for t, dtype in zip((grad_z, grad_mu, grad_logvar), dtypes))


def specializations() -> list[Specialization]:
    """Every compiled form the launchers above can request."""
    out = []
    for dtype, (block_b, block_l) in itertools.product(STORAGE_DTYPES, tiles()):
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        tile_args = {"COMPUTE": compute_dtype(torch.empty(0, dtype=dtype)), "BLOCK_B": block_b, "BLOCK_L": block_l}
        latent = {"z_ptr": dtype, "mu_ptr": dtype, "logvar_ptr": dtype}
        out.append(
            Specialization(
                _iwae_fwd_kernel,
                {"logp_ptr": compute, **latent, "loss_ptr": compute, "weights_ptr": compute},
                tile_args,
            )
        )
        for dreg in (False, True):
            pointers = {
                "grad_rows_ptr": compute,
                "weights_ptr": compute,
                **latent,
                "grad_z_ptr": dtype,
                "grad_mu_ptr": dtype,
                "grad_logvar_ptr": dtype,
            }
            out.append(Specialization(_iwae_bwd_kernel, pointers, {"DREG": dreg, **tile_args}))
    return out
