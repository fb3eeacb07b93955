"""fastvae::reparameterize_kl — z = mu + exp(0.5*logvar) * eps and the per-datapoint KL, in one pass.

One kernel reads mu and logvar once and writes z [B, L] and kl [B]. When eps is
not given, the kernel draws it with Philox from a seed; the op returns that seed
(an int64 scalar on the CPU) and backward regenerates eps from it instead of
storing a tensor the size of mu.

Why the seed is drawn inside the op from torch's default CPU generator (DESIGN.md):
`torch.manual_seed` then reproduces a run, nothing syncs with the GPU, and
torch.compile sees a tensor rather than a Python int it would specialize on.

Gradients (grad_z [B, L] and grad_kl [B] may both arrive):
    dz/dmu = 1,  dz/dlogvar = 0.5 * exp(0.5*logvar) * eps,  dz/deps = exp(0.5*logvar)
    dkl/dmu = mu,  dkl/dlogvar = 0.5 * (exp(logvar) - 1)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastvae.backend import backend_for
from fastvae.ops.common import FusedOp, as_rows, loss_dtype, view_as_shape
from fastvae.reference import SEED_HIGH


def draw_seed(generator: torch.Generator | None = None) -> Tensor:
    """A fresh Philox seed as an int64 scalar on the CPU, from `generator` or torch's default."""
    if generator is None or generator.device.type == "cpu":
        return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, generator=generator)
    # A CUDA generator draws on its device; the copy to the CPU is the caller's choice of generator.
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, generator=generator,
                         device=generator.device).cpu()


def _rows_or_none(t: Tensor | None) -> Tensor | None:
    return None if t is None else as_rows(t)


def _forward(mu: Tensor, logvar: Tensor, eps: Optional[Tensor],
                         seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """mu, logvar, eps [B, ...] -> z [B, ...] (mu's dtype), kl [B] (float32), seed used (int64 [] CPU).

    With eps None, noise comes from `seed`, or from a seed drawn here when seed is None."""
    if eps is not None:
        seed_used = torch.zeros((), dtype=torch.int64)
    else:
        seed_used = draw_seed() if seed is None else seed.detach().to("cpu", torch.int64).clone()
    if mu.numel() == 0:
        return torch.empty_like(mu), mu.new_zeros(mu.shape[:1], dtype=loss_dtype(mu, logvar)), seed_used
    backend = backend_for(mu.device)
    z, kl = backend.reparameterize_kl_forward(as_rows(mu), as_rows(logvar), _rows_or_none(eps),
                                              int(seed_used))
    return view_as_shape(z, mu.shape), kl, seed_used


reparameterize_kl_op = torch.library.custom_op("fastvae::reparameterize_kl", _forward, mutates_args=())


@reparameterize_kl_op.register_fake
def _(mu: Tensor, logvar: Tensor, eps: Optional[Tensor],
      seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    z = torch.empty_like(mu, memory_format=torch.contiguous_format)
    kl = mu.new_empty(mu.shape[:1], dtype=loss_dtype(mu, logvar))
    return z, kl, torch.empty((), dtype=torch.int64, device="cpu")


def _backward_forward(grad_z: Optional[Tensor], grad_kl: Optional[Tensor], mu: Tensor,
                                  logvar: Tensor, eps: Optional[Tensor],
                                  seed: Tensor) -> tuple[Tensor, Tensor]:
    """grad_z [B, ...] | None, grad_kl [B] | None -> grad_mu, grad_logvar (mu's and logvar's shape)."""
    if mu.numel() == 0:
        return torch.zeros_like(mu), torch.zeros_like(logvar)
    backend = backend_for(mu.device)
    grad_mu, grad_logvar = backend.reparameterize_kl_backward(
        _rows_or_none(grad_z), grad_kl, as_rows(mu), as_rows(logvar), _rows_or_none(eps), int(seed))
    return view_as_shape(grad_mu, mu.shape), view_as_shape(grad_logvar, logvar.shape)


reparameterize_kl_backward_op = torch.library.custom_op("fastvae::reparameterize_kl_backward",
                                                        _backward_forward, mutates_args=())
reparameterize_kl_backward = FusedOp(reparameterize_kl_backward_op, _backward_forward)


@reparameterize_kl_backward_op.register_fake
def _(grad_z: Optional[Tensor], grad_kl: Optional[Tensor], mu: Tensor, logvar: Tensor,
      eps: Optional[Tensor], seed: Tensor) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(logvar, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    mu, logvar, eps, _ = inputs
    ctx.save_for_backward(mu, logvar, eps, output[2])
    # An output the caller did not use (kl of reparameterize(), or z when only kl is
    # used) arrives as None instead of zeros: the backward kernel skips its term.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_z: Tensor | None, grad_kl: Tensor | None, _grad_seed: Tensor | None):
    mu, logvar, eps, seed = ctx.saved_tensors
    grad_mu = grad_logvar = grad_eps = None
    if grad_z is None and grad_kl is None:
        return grad_mu, grad_logvar, grad_eps, None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_mu, grad_logvar = reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed)
    if ctx.needs_input_grad[2] and grad_z is not None:
        # Rare (eps as a learned input): plain PyTorch is enough here.
        compute = loss_dtype(grad_z, logvar)
        grad_eps = (grad_z.to(compute) * torch.exp(0.5 * logvar.to(compute))).to(eps.dtype)
    return grad_mu, grad_logvar, grad_eps, None


reparameterize_kl = FusedOp(reparameterize_kl_op, _forward, _setup_context, _backward)
