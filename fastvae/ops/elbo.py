"""The negative ELBO from the Bernoulli op and the per-datapoint KL, as one eager autograd node.

    loss     = (beta * kl_sum - logp_sum) / divisor   (divisor B for a mean, 1 for a sum)
    logp_sum = sum_b log p(x_b | logits_b),  kl_sum = sum_b kl_b   (statistics, no gradient)

Traced code (torch.compile, export, dispatch modes) builds the loss from the Bernoulli
custom op and a few torch ops, which inductor fuses into the surrounding graph. In plain
eager mode those ops record four more autograd nodes beside the Bernoulli op's own, and at
a training batch size each node costs about what the Bernoulli kernel does. `NegativeELBO`
is one node: its forward runs the Bernoulli kernel with the loss weight -1/divisor, so the
gradient it saves already is d(loss)/d(logits), and the sums with autograd off; its
backward hands that gradient over when the upstream gradient is exactly 1 (loss.backward()).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fastvae.ops.bernoulli import _forward as _bernoulli_forward  # the op's own forward: one place per kernel call
from fastvae.ops.common import plain_eager_call, scale_saved_grad


def fuses_eagerly(logits: Tensor, target: Tensor, kl: Tensor, beta: float | Tensor) -> bool:
    """Whether NegativeELBO may run this call: plain eager tensors, and a beta that is a number
    or a tensor nothing differentiates (a beta that requires grad takes the traced form)."""
    if isinstance(beta, Tensor) and beta.requires_grad:
        return False
    return plain_eager_call((logits, target, kl, beta))


def negative_elbo_value(logp_sum: Tensor, kl_sum: Tensor, beta: float | Tensor, divisor: int) -> Tensor:
    """(beta * kl_sum - logp_sum) / divisor, the same ops eager (NegativeELBO) and traced (elbo_loss).

    A division, not a multiply by 1/divisor: see fastvae.functional._reduce_rows."""
    weighted_kl = kl_sum if isinstance(beta, numbers.Real) and beta == 1 else beta * kl_sum
    loss = torch.sub(weighted_kl, logp_sum)
    return loss if divisor == 1 else loss / divisor


def _is_one(grad: Tensor) -> bool:
    """Whether the upstream gradient is exactly 1, read only where that costs nothing: a CPU
    tensor (a CUDA read would synchronize), and no double backward being recorded."""
    return grad.device.type == "cpu" and not torch.is_grad_enabled() and grad.item() == 1.0


class NegativeELBO(torch.autograd.Function):
    """apply(logits [B, ...], target [B, ...], kl [B], beta (float or tensor), divisor) -> (loss, logp_sum, kl_sum)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, kl: Tensor, beta: float | Tensor,
                divisor: int) -> tuple[Tensor, Tensor, Tensor]:
        weight = -1.0 / divisor
        logp, dlogits = _bernoulli_forward(logits, target, False, ctx.needs_input_grad[0], weight)
        logp_sum, kl_sum = logp.sum(), kl.sum()
        loss = negative_elbo_value(logp_sum, kl_sum, beta, divisor)
        ctx.mark_non_differentiable(logp_sum, kl_sum)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, target)
        # An intermediate, so kept on ctx rather than saved: backward gives it away, and
        # whoever receives it may change it in place (a hook, an optimizer's zero_grad).
        ctx.dlogits = dlogits
        ctx.beta, ctx.divisor, ctx.weight = beta, divisor, weight
        ctx.kl_shape, ctx.kl_dtype = kl.shape, kl.dtype
        return loss, logp_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, _grad_logp_sum: None, _grad_kl_sum: None):
        grad_logits = grad_target = grad_kl = None
        if grad_loss is None:
            return None, None, None, None, None
        logits, target = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            dlogits, ctx.dlogits = ctx.dlogits, None  # used once: handed over, or scaled and dropped
            if dlogits is None:  # a second backward (retain_graph): the first one gave it away
                _, dlogits = _bernoulli_forward(logits, target, False, True, ctx.weight)
            grad_logits = dlogits if _is_one(grad_loss) else scale_saved_grad(dlogits, grad_loss)
        if ctx.needs_input_grad[1]:  # dlogp/dtarget = logits
            grad_target = scale_saved_grad(logits, grad_loss * ctx.weight).to(target.dtype)
        if ctx.needs_input_grad[2]:
            grad_kl = grad_loss * (ctx.beta / ctx.divisor)  # beta a float or a tensor
            if grad_kl.dtype != ctx.kl_dtype:
                grad_kl = grad_kl.to(ctx.kl_dtype)
            grad_kl = grad_kl.expand(ctx.kl_shape)  # a broadcast view, as the backward of kl.sum() gives
        return grad_logits, grad_target, grad_kl, None, None
