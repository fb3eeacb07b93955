"""fastvae::gaussian_log_likelihood: log N(x; mean, exp(logvar)) with its gradients computed in the forward pass.

log p = -0.5 * ((x - m)^2 * exp(-s) + s + log 2pi);  dlogp/dm = (x - m) * exp(-s),
dlogp/ds = 0.5 * ((x - m)^2 * exp(-s) - 1),  dlogp/dx = -dlogp/dm.

logvar is None (unit variance), a tensor of the mean's shape (a decoder output), or any
shape that broadcasts to it (a learned scalar or per-feature log-variance). The kernels read
a log-variance shared by all datapoints as one row, never expanded to [B, D]; its per-element
gradient comes out in float32 (float64 for float64 inputs) and backward sums it to logvar's
shape. As for the likelihoods from logits (fastvae.ops.logits_likelihood), a `weight_divisor`
makes the saved gradients dlogp / weight_divisor, handed over as they are when loss.backward()
passes that weight itself (elbo_loss's -1/B); both gradients are handed over together.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastvae.ops.common import (
    FusedOp,
    as_rows,
    composite_vjp,
    loss_dtype,
    no_grad_placeholder,
    rows_shape,
    rows_weight,
    saved_grad_rescaler,
    scale_saved_grad,
    view_as_shape,
)
from fastvae.ops.gaussian_likelihood.reference import grads, log_prob
from fastvae.ops.registry import implementation


def _logvar_grad_dtype(mean: Tensor, target: Tensor, logvar: Tensor) -> torch.dtype:
    """The dtype of the op's per-element dlogp/dlogvar: logvar's for one of the mean's shape, else
    the compute dtype (the gradient is summed over the broadcast dims, from unrounded values)."""
    return logvar.dtype if logvar.shape == mean.shape else loss_dtype(mean, target, logvar)


def _logvar_rows(logvar: Optional[Tensor], mean: Tensor, compute: torch.dtype) -> Optional[Tensor]:
    """logvar as the kernels read it, rows [R, D] with R dividing B: its own rows when it has the
    mean's shape; one row [1, D] when it is the same for every datapoint (a scalar or per-feature
    log-variance: D elements, not B * D); else expanded to [B, D], in the compute dtype."""
    if logvar is None or logvar.shape == mean.shape:
        return None if logvar is None else as_rows(logvar)
    if logvar.dim() == mean.dim() and logvar.shape[0] != 1:  # one value per datapoint, shared within it
        return as_rows(logvar.to(compute).expand(mean.shape))  # as_rows copies: the expanded columns have stride 0
    shared = logvar[0] if logvar.dim() == mean.dim() else logvar
    return as_rows(shared.expand(mean.shape[1:]).unsqueeze(0))


def _gaussian(
    mean: Tensor,
    target: Tensor,
    logvar: Optional[Tensor],
    elementwise: bool,
    compute_grad: bool,
    weight_divisor: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """mean, target [B, ...], logvar None or broadcasting to them -> log p (mean's shape if
    elementwise else [B]), dlogp/dmean and dlogp/dlogvar / weight_divisor (see
    common.rows_weight), both mean's shape (empty tensors unless compute_grad, and for dlogvar
    without logvar)."""
    if weight_divisor is not None and elementwise:
        raise ValueError("gaussian_log_likelihood: a weight scales the rows' sum, so elementwise must be False")
    compute = loss_dtype(mean, target, logvar)
    if mean.numel() == 0:
        logp = mean.new_zeros(rows_shape(mean, elementwise), dtype=compute)
        if not compute_grad:
            return logp, no_grad_placeholder(mean), no_grad_placeholder(mean)
        dlogvar = (
            no_grad_placeholder(mean)
            if logvar is None
            else mean.new_zeros(mean.shape, dtype=_logvar_grad_dtype(mean, target, logvar))
        )
        return logp, torch.zeros_like(mean), dlogvar
    kernel = implementation("gaussian_likelihood", "gaussian_likelihood_forward", mean.device)
    logp, dmean, dlogvar = kernel(
        as_rows(mean),
        as_rows(target),
        _logvar_rows(logvar, mean, compute),
        elementwise,
        compute_grad,
        rows_weight(weight_divisor),
    )
    logp = view_as_shape(logp, rows_shape(mean, elementwise))
    if not compute_grad:
        return logp, no_grad_placeholder(mean), no_grad_placeholder(mean)
    if dlogvar is None:
        dlogvar = no_grad_placeholder(mean)
    else:  # a single shared row gives logvar's dtype when B = 1
        dlogvar = view_as_shape(dlogvar.to(_logvar_grad_dtype(mean, target, logvar)), mean.shape)
    return logp, view_as_shape(dmean, mean.shape), dlogvar


def gaussian_log_likelihood_composite(
    mean: Tensor,
    target: Tensor,
    logvar: Optional[Tensor],
    elementwise: bool,
    compute_grad: bool,
    weight_divisor: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The same outputs from torch ops, differentiable by every autograd mode."""
    compute = loss_dtype(mean, target, logvar)
    m, x = mean.to(compute), target.to(compute)
    s = None if logvar is None else logvar.to(compute)
    logp = log_prob(m, x, s)
    logp = logp if elementwise else logp.reshape(mean.shape[0], -1).sum(dim=1)
    if not compute_grad:
        return logp, no_grad_placeholder(mean), no_grad_placeholder(mean)
    scale = rows_weight(weight_divisor)
    dmean, dlogvar = grads(m, x, s)
    dlogvar = (
        no_grad_placeholder(mean) if dlogvar is None else (scale * dlogvar).to(_logvar_grad_dtype(mean, target, logvar))
    )
    return logp, (scale * dmean).to(mean.dtype), dlogvar


gaussian_log_likelihood_op = torch.library.custom_op("fastvae::gaussian_log_likelihood", _gaussian, mutates_args=())


@gaussian_log_likelihood_op.register_fake
def _(
    mean: Tensor,
    target: Tensor,
    logvar: Optional[Tensor],
    elementwise: bool,
    compute_grad: bool,
    weight_divisor: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    logp = mean.new_empty(rows_shape(mean, elementwise), dtype=loss_dtype(mean, target, logvar))
    if not compute_grad:
        return logp, no_grad_placeholder(mean), no_grad_placeholder(mean)
    dlogvar = (
        no_grad_placeholder(mean)
        if logvar is None
        else mean.new_empty(mean.shape, dtype=_logvar_grad_dtype(mean, target, logvar))
    )
    return logp, torch.empty_like(mean, memory_format=torch.contiguous_format), dlogvar


def _setup(ctx, inputs, output) -> None:
    mean, target, logvar, elementwise, compute_grad, *rest = inputs
    ctx.compute_grad, ctx.elementwise = compute_grad, elementwise
    ctx.weight_divisor = rest[0] if rest else None
    ctx.handed_over = False
    ctx.set_materialize_grads(False)  # no zero-filled [B, D] gradients for the gradient outputs
    ctx.target_dtype = target.dtype
    if getattr(ctx, "eager", False):
        # Kept on ctx, not saved: backward may give them away (see logits_likelihood.py).
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.dmean, ctx.dlogvar = output[1], output[2]
        ctx.save_for_backward(mean, target, logvar)
    else:
        ctx.save_for_backward(mean, target, logvar, output[1], output[2])


def _grads(ctx, grad_logp: Tensor | None, _grad_dmean: Tensor | None, _grad_dlogvar: Tensor | None):
    if grad_logp is None:  # only the gradient outputs were used: they carry no gradient
        return (None,) * 6
    mean, target, logvar, *saved = ctx.saved_tensors
    dmean, dlogvar = saved if saved else (ctx.dmean, ctx.dlogvar)
    needs_mean, needs_target, needs_logvar = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: record a differentiable backward
        inputs = (mean, target, logvar, ctx.elementwise, False, None)
        return tuple(
            composite_vjp(
                gaussian_log_likelihood_composite, inputs, (grad_logp,), ctx.needs_input_grad[:3] + (False,) * 3
            )
        )
    grad_mean = grad_target = grad_logvar = None
    if needs_mean or needs_logvar:
        if not ctx.compute_grad or ctx.handed_over:
            # Called with compute_grad=False, or a second backward (retain_graph) after the
            # saved gradients were handed over and may have been changed by their receivers.
            _, dmean, dlogvar = gaussian_log_likelihood_fused(
                mean, target, logvar, ctx.elementwise, True, ctx.weight_divisor
            )
        rescale, given_away = saved_grad_rescaler(grad_logp, ctx.weight_divisor, ctx.handed_over, bool(saved))
        if given_away:
            ctx.handed_over = True
            ctx.dmean = ctx.dlogvar = None  # the receivers own them now
        if needs_mean:
            grad_mean = rescale(dmean)
        if needs_logvar:
            per_element = rescale(dlogvar)
            grad_logvar = per_element.sum_to_size(logvar.shape).to(logvar.dtype)
    if needs_target:
        compute = loss_dtype(mean, target, logvar)
        dlogp_dmean = grads(mean.to(compute), target.to(compute), None if logvar is None else logvar.to(compute))[0]
        grad_target = scale_saved_grad(-dlogp_dmean, grad_logp).to(ctx.target_dtype)
    return grad_mean, grad_target, grad_logvar, None, None, None


gaussian_log_likelihood_fused = FusedOp(
    gaussian_log_likelihood_op, _gaussian, gaussian_log_likelihood_composite, _setup, _grads
)
