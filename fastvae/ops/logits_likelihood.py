"""The custom op of a likelihood from logits against a target in [0, 1], with its gradient computed
in the forward pass: what the Bernoulli and the continuous Bernoulli families share.

Such an op takes (logits, target, elementwise, compute_grad, weight_divisor) and returns log p
(logits' shape if elementwise, else per datapoint [B]) and weight * dlogp/dlogits, with
weight = 1 / weight_divisor (see common.rows_weight). Computing
the gradient while logits and target are in registers saves the backward pass a second read
of both: backward is one multiply by the upstream gradient, or nothing.

With a weight, the caller's loss term is weight * (sum of the per-row log p) and the kernel
writes weight * dlogp/dl. elbo_loss calls it so (divisor -B, weight -1/B): when backward then receives
the rows' gradient that loss.backward() gives (weight itself, broadcast), the saved gradient
already is d(loss)/d(logits) and is handed over as is, with no pass over [B, D] left to make
(see fastvae.ops.common.is_the_weight). dlogp/dtarget = logits for both families (their
normalizers do not depend on the target).
"""

from __future__ import annotations

from collections.abc import Callable

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
from fastvae.ops.registry import implementation


def logits_likelihood_op(
    name: str,
    family: str,
    kernel: str,
    log_prob: Callable[[Tensor, Tensor], Tensor],
    grad_logits: Callable[[Tensor, Tensor], Tensor],
) -> FusedOp:
    """The FusedOp `fastvae::<name>` that runs `kernel` of op family `family` (see registry.py).

    log_prob(l, x) and grad_logits(l, x) are the reference's per-element log p and dlogp/dl in
    torch ops: the composite (torch.func transforms, double backward) is built from them."""

    def forward(
        logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool, weight_divisor: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """logits, target [B, ...] -> log p (logits' shape if elementwise else [B]), and
        dlogp/dlogits / weight_divisor (an empty tensor unless compute_grad)."""
        if weight_divisor is not None and elementwise:
            raise ValueError(f"{name}: a weight scales the rows' sum, so elementwise must be False")
        if logits.numel() == 0:
            logp = logits.new_zeros(rows_shape(logits, elementwise), dtype=loss_dtype(logits, target))
            return logp, torch.zeros_like(logits) if compute_grad else no_grad_placeholder(logits)
        run = implementation(family, kernel, logits.device)
        logp, dlogits = run(as_rows(logits), as_rows(target), elementwise, compute_grad, rows_weight(weight_divisor))
        logp = view_as_shape(logp, rows_shape(logits, elementwise))
        if not compute_grad:
            return logp, no_grad_placeholder(logits)
        return logp, view_as_shape(dlogits, logits.shape)

    def log_prob_of(l: Tensor, x: Tensor, elementwise: bool) -> Tensor:
        logp = log_prob(l, x)
        return logp if elementwise else logp.reshape(l.shape[0], -1).sum(dim=1)

    class WrittenOutDerivative(torch.autograd.Function):
        """log_prob_of with its derivative written out: grad * dlogp/dl and grad * l for the target.
        Autograd's own derivative of log_prob recomputes the softplus tail's pieces (exp, where,
        the division by 1 + e); this one is the single sigmoid that plain BCE-with-logits' backward
        computes. Its backward is torch ops, so autograd can differentiate it again."""

        @staticmethod
        def forward(ctx, l: Tensor, x: Tensor, elementwise: bool) -> Tensor:
            ctx.save_for_backward(l, x)
            return log_prob_of(l, x, elementwise)

        @staticmethod
        def backward(ctx, grad: Tensor):
            l, x = ctx.saved_tensors
            grad = grad.reshape(grad.shape + (1,) * (l.dim() - grad.dim()))  # a row's over its elements
            grad_l = grad * grad_logits(l, x) if ctx.needs_input_grad[0] else None
            grad_x = grad * l if ctx.needs_input_grad[1] else None
            return grad_l, grad_x, None

    def outputs(
        logp_of: Callable,
        logits: Tensor,
        target: Tensor,
        elementwise: bool,
        compute_grad: bool,
        weight_divisor: int | None,
    ) -> tuple[Tensor, Tensor]:
        compute = loss_dtype(logits, target)
        l, x = logits.to(compute), target.to(compute)
        logp = logp_of(l, x, elementwise)
        if not compute_grad:
            return logp, no_grad_placeholder(logits)
        return logp, (rows_weight(weight_divisor) * grad_logits(l, x)).to(logits.dtype)

    def composite(
        logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool, weight_divisor: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The same outputs from torch ops, differentiable by every autograd mode."""
        return outputs(log_prob_of, logits, target, elementwise, compute_grad, weight_divisor)

    def lowered(
        logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool, weight_divisor: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The composite as a compiled CPU graph gets it: the derivative written out, which an
        autograd.Function can be there (AOTAutograd traces it; dynamo, which could not trace its
        torch.func rules, never sees it) and not in the composite torch.func transforms use."""
        return outputs(WrittenOutDerivative.apply, logits, target, elementwise, compute_grad, weight_divisor)

    custom_op = torch.library.custom_op(f"fastvae::{name}", forward, mutates_args=())

    @custom_op.register_fake
    def _(
        logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool, weight_divisor: int | None = None
    ) -> tuple[Tensor, Tensor]:
        logp = logits.new_empty(rows_shape(logits, elementwise), dtype=loss_dtype(logits, target))
        if not compute_grad:
            return logp, no_grad_placeholder(logits)
        return logp, torch.empty_like(logits, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output) -> None:
        logits, target, elementwise, compute_grad, *rest = inputs
        ctx.compute_grad, ctx.elementwise = compute_grad, elementwise
        ctx.weight_divisor = rest[0] if rest else None
        ctx.handed_over = False
        # Nothing differentiates through the gradient output: without this, autograd hands
        # backward a zero-filled [B, D] tensor for it on every call.
        ctx.set_materialize_grads(False)
        ctx.target_dtype = target.dtype
        # logits serve dlogp/dtarget (rare in a VAE) and, with target, recomputing dlogp/dlogits
        # when the op was called with compute_grad=False; saving inputs costs no memory.
        if getattr(ctx, "eager", False):
            # Eager, the gradient output is kept on ctx rather than saved: backward may give it
            # away, and its receiver may change it in place (a hook, an optimizer's zero_grad),
            # which would make a saved tensor fail a second backward's version check.
            ctx.mark_non_differentiable(output[1])
            ctx.dlogits = output[1]
            ctx.save_for_backward(logits, target)
        else:
            ctx.save_for_backward(logits, target, output[1])

    def backward(ctx, grad_logp: Tensor | None, _grad_dlogits: Tensor | None):
        if grad_logp is None:  # only the gradient output was used: it carries no gradient
            return None, None, None, None, None
        logits, target, *saved = ctx.saved_tensors
        dlogits = saved[0] if saved else ctx.dlogits
        if torch.is_grad_enabled():  # create_graph=True: record a differentiable backward
            inputs = (logits, target, ctx.elementwise, False, None)
            return tuple(composite_vjp(composite, inputs, (grad_logp,), ctx.needs_input_grad[:2] + (False,) * 3))
        grad_logits_out = grad_target = None
        if ctx.needs_input_grad[0]:
            if not ctx.compute_grad or ctx.handed_over:
                # Called with compute_grad=False, or a second backward (retain_graph) after the
                # saved gradient was handed over and may have been changed by its receiver.
                _, dlogits = fused(logits, target, ctx.elementwise, True, ctx.weight_divisor)
            rescale, given_away = saved_grad_rescaler(grad_logp, ctx.weight_divisor, ctx.handed_over, bool(saved))
            grad_logits_out = rescale(dlogits)
            if given_away:
                ctx.handed_over = True
                ctx.dlogits = None  # the receiver owns it now
        if ctx.needs_input_grad[1]:
            grad_target = scale_saved_grad(logits, grad_logp).to(ctx.target_dtype)
        return grad_logits_out, grad_target, None, None, None

    fused = FusedOp(custom_op, forward, composite, setup_context, backward, lowered=lowered)
    return fused
