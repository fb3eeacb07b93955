"""Helpers shared by the op files: row views, loss dtype, gradient scaling."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def as_rows(t: Tensor) -> Tensor:
    """[B, ...] -> [B, N] with stride 1 along N; a view whenever the layout allows one.

    Strided rows (a chunk of a wider encoder output) stay views: every backend
    takes a row stride, so the common `mu, logvar = h.chunk(2, dim=1)` costs no copy."""
    rows = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


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
