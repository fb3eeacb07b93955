"""fastvae::gaussian_kl — KL(N(mu, exp(logvar)) || N(0, I)), gradient computed in the forward pass.

kl = 0.5 * (mu^2 + exp(logvar) - logvar - 1);  dkl/dmu = mu,  dkl/dlogvar = 0.5 * (exp(logvar) - 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.backend import backend_for
from fastvae.ops.common import (FusedOp, as_rows, loss_dtype, no_grad_placeholder, scale_saved_grad,
                               view_as_shape)


def _kl_shape(mu: Tensor, elementwise: bool) -> tuple[int, ...]:
    return tuple(mu.shape) if elementwise else tuple(mu.shape[:1])


def _forward(mu: Tensor, logvar: Tensor, elementwise: bool,
                   compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """mu, logvar [B, ...] -> kl (mu's shape if elementwise else [B]), dkl/dmu, dkl/dlogvar.

    The two gradients are empty tensors unless compute_grad."""
    dtype = loss_dtype(mu, logvar)
    if mu.numel() == 0:
        kl = mu.new_zeros(_kl_shape(mu, elementwise), dtype=dtype)
        grads = (torch.zeros_like(mu), torch.zeros_like(logvar)) if compute_grad else (
            no_grad_placeholder(mu), no_grad_placeholder(logvar))
        return (kl, *grads)
    backend = backend_for(mu.device)
    kl, dmu, dlogvar = backend.gaussian_kl_forward(as_rows(mu), as_rows(logvar), elementwise, compute_grad)
    kl = view_as_shape(kl, _kl_shape(mu, elementwise))
    if not compute_grad:
        return kl, no_grad_placeholder(mu), no_grad_placeholder(logvar)
    return kl, view_as_shape(dmu, mu.shape), view_as_shape(dlogvar, logvar.shape)


gaussian_kl_op = torch.library.custom_op("fastvae::gaussian_kl", _forward, mutates_args=())


@gaussian_kl_op.register_fake
def _(mu: Tensor, logvar: Tensor, elementwise: bool, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    kl = mu.new_empty(_kl_shape(mu, elementwise), dtype=loss_dtype(mu, logvar))
    if not compute_grad:
        return kl, no_grad_placeholder(mu), no_grad_placeholder(logvar)
    return kl, torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(
        logvar, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    mu, logvar, elementwise, compute_grad = inputs
    _, dmu, dlogvar = output
    ctx.compute_grad, ctx.elementwise = compute_grad, elementwise
    # As in bernoulli.py: no zero-filled gradients for the saved-gradient outputs.
    ctx.set_materialize_grads(False)
    # Without forward-pass gradients, keep the inputs so backward can compute them.
    ctx.save_for_backward(*((dmu, dlogvar) if compute_grad else (mu, logvar)))


def _backward(ctx, grad_kl: Tensor | None, _grad_dmu: Tensor | None, _grad_dlogvar: Tensor | None):
    if grad_kl is None:  # only the saved-gradient outputs were used: they carry no gradient
        return None, None, None, None
    dmu, dlogvar = ctx.saved_tensors
    if not ctx.compute_grad:  # called directly with compute_grad=False, then differentiated
        _, dmu, dlogvar = gaussian_kl(dmu, dlogvar, ctx.elementwise, True)
    return scale_saved_grad(dmu, grad_kl), scale_saved_grad(dlogvar, grad_kl), None, None


gaussian_kl = FusedOp(gaussian_kl_op, _forward, _setup_context, _backward)
