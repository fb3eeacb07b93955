"""fastvae::bernoulli_log_likelihood — log p(x | logits), gradient computed in the forward pass.

log p = x*l - softplus(l) = -(max(l, 0) - l*x + log1p(exp(-|l|)));  dlogp/dl = x - sigmoid(l),  dlogp/dx = l.
Computing dlogp/dl while logits and target are in registers saves the backward
pass a second read of both: backward is one multiply by the upstream gradient.

With a `weight`, the caller's loss term is weight * sum of the per-row log p, and the
kernel writes weight * dlogp/dl. elbo_loss calls it so (weight -1/B): when backward
gets the rows' gradient that loss.backward() gives (weight itself, expanded), the
saved gradient already is d(loss)/d(logits) and is handed over as is, with no pass
over [B, D] left to make. (The op returns rows, not the weighted sum: with a 0-dim
output the inductor-compiled training step of fastvae-train aborted with glibc heap
corruption, torch 2.14.1 on CPU, on the torch backend too; not understood yet.)
"""

from __future__ import annotations

import struct
from typing import Optional

import torch
from torch import Tensor

from fastvae.backend import backend_for
from fastvae.ops.common import (FusedOp, as_rows, loss_dtype, no_grad_placeholder, scale_saved_grad,
                               view_as_shape)


def _logp_shape(logits: Tensor, elementwise: bool) -> tuple[int, ...]:
    return tuple(logits.shape) if elementwise else tuple(logits.shape[:1])


def _forward(logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool,
             weight: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """logits, target [B, ...] -> log p (logits' shape if elementwise else [B]), and
    weight * dlogp/dlogits (weight 1 when None; an empty tensor unless compute_grad)."""
    if weight is not None and elementwise:
        raise ValueError("bernoulli_log_likelihood: a weight sums log p, so elementwise must be False")
    dtype = loss_dtype(logits, target)
    if logits.numel() == 0:
        logp = logits.new_zeros(_logp_shape(logits, elementwise), dtype=dtype)
        return logp, torch.zeros_like(logits) if compute_grad else no_grad_placeholder(logits)
    backend = backend_for(logits.device)
    logp, dlogits = backend.bernoulli_log_likelihood_forward(
        as_rows(logits), as_rows(target), elementwise, compute_grad, 1.0 if weight is None else weight)
    logp = view_as_shape(logp, _logp_shape(logits, elementwise))
    if not compute_grad:
        return logp, no_grad_placeholder(logits)
    return logp, view_as_shape(dlogits, logits.shape)


bernoulli_log_likelihood_op = torch.library.custom_op("fastvae::bernoulli_log_likelihood", _forward,
                                                      mutates_args=())


@bernoulli_log_likelihood_op.register_fake
def _(logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool,
      weight: Optional[float] = None) -> tuple[Tensor, Tensor]:
    logp = logits.new_empty(_logp_shape(logits, elementwise), dtype=loss_dtype(logits, target))
    if not compute_grad:
        return logp, no_grad_placeholder(logits)
    return logp, torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    logits, target, elementwise, compute_grad, *rest = inputs
    ctx.compute_grad, ctx.elementwise = compute_grad, elementwise
    ctx.weight = rest[0] if rest else None
    ctx.handed_over = False
    # Nothing differentiates through the saved-gradient output: without this, autograd
    # hands backward a zero-filled [B, D] tensor for it on every call.
    ctx.set_materialize_grads(False)
    ctx.target_dtype = target.dtype
    # logits serve dlogp/dtarget (rare in a VAE) and, with target, recomputing dlogp/dlogits
    # when the op was called with compute_grad=False; saving inputs costs no memory.
    ctx.save_for_backward(output[1], logits, target)


def _is_the_weight(grad_logp: Tensor, weight: float) -> bool:
    """Whether the rows' gradient is `weight` itself, broadcast (what loss.backward() gives
    when the loss weights the rows' sum by it), checked only where that costs nothing:
    eager on the CPU, a plain tensor (a CUDA read would synchronize; a trace or a fake
    tensor has no value to read), and no double backward being recorded."""
    return (type(grad_logp) is Tensor and grad_logp.dim() == 1 and grad_logp.numel() > 0
            and grad_logp.stride(0) == 0 and grad_logp.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch.is_grad_enabled()
            and grad_logp[0].item() == _in_dtype(weight, grad_logp.dtype))


def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to float32 unless dtype is float64 (the losses' two dtypes), as a Python float."""
    return value if dtype == torch.float64 else struct.unpack("f", struct.pack("f", value))[0]


def _backward(ctx, grad_logp: Tensor | None, _grad_dlogits: Tensor | None):
    dlogits, logits, target = ctx.saved_tensors
    grad_logits = grad_target = None
    if grad_logp is None:  # only the saved-gradient output was used: it carries no gradient
        return None, None, None, None, None
    if ctx.needs_input_grad[0]:
        if not ctx.compute_grad or ctx.handed_over:
            # Called with compute_grad=False, or a second backward (retain_graph) after the
            # saved gradient was handed over and may have been changed by its receiver.
            _, dlogits = bernoulli_log_likelihood(logits, target, ctx.elementwise, True, ctx.weight)
        if ctx.weight is None:
            grad_logits = scale_saved_grad(dlogits, grad_logp)
        elif not ctx.handed_over and _is_the_weight(grad_logp, ctx.weight):
            ctx.handed_over = True
            grad_logits = dlogits
        else:  # the saved gradient carries the weight already
            grad_logits = scale_saved_grad(dlogits, grad_logp / ctx.weight)
    if ctx.needs_input_grad[1]:
        grad_target = scale_saved_grad(logits, grad_logp).to(ctx.target_dtype)
    return grad_logits, grad_target, None, None, None


bernoulli_log_likelihood = FusedOp(bernoulli_log_likelihood_op, _forward, _setup_context, _backward)
