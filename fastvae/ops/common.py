"""Helpers shared by the op files: row views, loss dtype, gradient scaling."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def as_rows(t: Tensor) -> Tensor:
    """[B, ...] -> [B, N] with stride 1 along N; a view whenever the layout allows one.

    Strided rows (a chunk of a wider encoder output) stay views: every backend
    takes a row stride, so the common `mu, logvar = h.chunk(2, dim=1)` costs no copy."""
    if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1):
        return t  # already rows: the common case, returned without a reshape call
    rows = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def view_as_shape(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """t viewed as `shape`; t itself when it already has it (a view call costs about 2 us)."""
    return t if t.shape == shape else t.view(shape)


def loss_dtype(*tensors: Tensor) -> torch.dtype:
    """Losses are float32, or float64 when any input is float64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def no_grad_placeholder(like: Tensor) -> Tensor:
    """What a saved-gradient output holds when no gradient was asked for: custom ops cannot return None."""
    return like.new_empty(0)


def scale_saved_grad(saved: Tensor, grad_output: Tensor) -> Tensor:
    """saved [B, ...] * grad_output ([B] or saved's shape), in saved's dtype.

    Terminal losses compute d(loss)/d(input) in the forward pass; backward only
    applies the chain rule with the upstream gradient, one elementwise multiply."""
    g = grad_output.reshape(grad_output.shape + (1,) * (saved.dim() - grad_output.dim()))
    if saved.dtype in (torch.float16, torch.bfloat16):
        # Multiply in float32 and round once: a "mean" over many elements makes g tiny,
        # and rounding g to half precision first would lose digits twice.
        return (saved.float() * g.float()).to(saved.dtype)
    return saved * g.to(saved.dtype)


def plain_eager_call(args: tuple) -> bool:
    """True when nothing but eager PyTorch can observe this call: no torch.compile or
    export trace, no torch function or dispatch mode (fake tensors, profilers that
    record aten ops, FlopCounter), no torch.func transform, only plain tensors."""
    if torch.compiler.is_compiling() or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, Tensor))


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


class FusedOp:
    """A fused op as fastvae.functional calls it: one forward, setup_context and backward,
    reachable two ways that run the same three functions.

    - `custom_op`, the registered torch.library op: what torch.compile, export, fake
      tensors, dispatch modes and torch.library.opcheck see (one opaque graph node).
    - For a plain eager call, a torch.autograd.Function built from the same functions.
      A Python custom op crosses the dispatcher several times per call (Python autograd
      kernel, redispatch, Python implementation, generated backward): skipping them took
      one op's forward + backward on tiny tensors from 186 to 143 us on a 2-core CPU,
      against kernels that run in about 60 us at training batch sizes (the Bernoulli op
      at 128 x 784).

    An op without backward (reparameterize_kl_backward) calls `forward` directly in
    eager mode, unless its inputs require grad under grad mode: then the custom op
    raises torch's own error for an op without a derivative instead of silently
    detaching."""

    def __init__(self, custom_op, forward, setup_context=None, backward=None) -> None:
        self.custom_op, self.forward = custom_op, forward
        self._function = None
        if backward is not None:
            custom_op.register_autograd(backward, setup_context=setup_context)

            def function_forward(ctx, *args):
                # The ctx-first form: with a separate setup_context, Function.apply runs
                # inspect.signature on every call (about 20 us).
                output = forward(*args)
                setup_context(ctx, args, output)
                return output

            self._function = type(f"{custom_op._name}_eager", (torch.autograd.Function,), {
                "forward": staticmethod(function_forward),
                "backward": staticmethod(backward),
            })

    def __call__(self, *args):
        if not plain_eager_call(args):
            return self.custom_op(*args)
        if self._function is not None:
            return self._function.apply(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return self.custom_op(*args)
        return self.forward(*args)
