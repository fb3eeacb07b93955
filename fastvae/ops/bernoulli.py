"""fastvae::bernoulli_log_likelihood — log p(x | logits), gradient computed in the forward pass.

log p = x*l - softplus(l) = -(max(l, 0) - l*x + log1p(exp(-|l|)));  dlogp/dl = x - sigmoid(l),  dlogp/dx = l.
Computing dlogp/dl while logits and target are in registers saves the backward
pass a second read of both: backward is one multiply by the upstream gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.backend import backend_for
from fastvae.ops.common import FusedOp, as_rows, loss_dtype, no_grad_placeholder, scale_saved_grad


def _logp_shape(logits: Tensor, elementwise: bool) -> tuple[int, ...]:
    return tuple(logits.shape) if elementwise else tuple(logits.shape[:1])


def _forward(logits: Tensor, target: Tensor, elementwise: bool,
                                compute_grad: bool) -> tuple[Tensor, Tensor]:
    """logits, target [B, ...] -> log p (logits' shape if elementwise else [B]), dlogp/dlogits.

    The gradient is an empty tensor unless compute_grad."""
    dtype = loss_dtype(logits, target)
    if logits.numel() == 0:
        logp = logits.new_zeros(_logp_shape(logits, elementwise), dtype=dtype)
        return logp, torch.zeros_like(logits) if compute_grad else no_grad_placeholder(logits)
    backend = backend_for(logits.device)
    logp, dlogits = backend.bernoulli_log_likelihood_forward(
        as_rows(logits), as_rows(target), elementwise, compute_grad)
    logp = logp.view(_logp_shape(logits, elementwise))
    if not compute_grad:
        return logp, no_grad_placeholder(logits)
    return logp, dlogits.view(logits.shape)


bernoulli_log_likelihood_op = torch.library.custom_op("fastvae::bernoulli_log_likelihood", _forward,
                                                      mutates_args=())


@bernoulli_log_likelihood_op.register_fake
def _(logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool) -> tuple[Tensor, Tensor]:
    logp = logits.new_empty(_logp_shape(logits, elementwise), dtype=loss_dtype(logits, target))
    if not compute_grad:
        return logp, no_grad_placeholder(logits)
    return logp, torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    logits, target, elementwise, compute_grad = inputs
    ctx.compute_grad, ctx.elementwise = compute_grad, elementwise
    # Nothing differentiates through the saved-gradient output: without this, autograd
    # hands backward a zero-filled [B, D] tensor for it on every call.
    ctx.set_materialize_grads(False)
    ctx.target_dtype = target.dtype
    # logits serve dlogp/dtarget (rare in a VAE) and, with target, recomputing dlogp/dlogits
    # when the op was called with compute_grad=False; saving inputs costs no memory.
    ctx.save_for_backward(output[1], logits, target)


def _backward(ctx, grad_logp: Tensor | None, _grad_dlogits: Tensor | None):
    dlogits, logits, target = ctx.saved_tensors
    grad_logits = grad_target = None
    if grad_logp is None:  # only the saved-gradient output was used: it carries no gradient
        return None, None, None, None
    if ctx.needs_input_grad[0]:
        if not ctx.compute_grad:  # called directly with compute_grad=False, then differentiated
            _, dlogits = bernoulli_log_likelihood(logits, target, ctx.elementwise, True)
        grad_logits = scale_saved_grad(dlogits, grad_logp)
    if ctx.needs_input_grad[1]:
        grad_target = scale_saved_grad(logits, grad_logp).to(ctx.target_dtype)
    return grad_logits, grad_target, None, None


bernoulli_log_likelihood = FusedOp(bernoulli_log_likelihood_op, _forward, _setup_context, _backward)
