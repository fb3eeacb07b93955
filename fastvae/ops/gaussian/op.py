"""fastvae::reparameterize_kl and fastvae::gaussian_kl: custom ops, fake implementations, autograd.

reparameterize_kl reads mu and logvar once and writes z [B, L] and kl [B]. When eps is
not given, the kernel draws it with Philox from a seed; the op returns that seed (a
0-d int64 tensor on the inputs' device) and backward regenerates eps from it instead of
storing a tensor the size of mu. With `samples` K (not None) it writes z [K, B, L]: sample
k of row b is z[k, b] (the kernels read mu and logvar with a row period of B, and the noise
of z[k, b, j] is the Philox stream at flat index (k * B + b) * L + j, the same as K copies
of the rows would draw); eps, if given, is [K, B, L]. kl stays [B].

Gradients (grad_z [B, L] or [K, B, L] and grad_kl [B] may both arrive):
    dz/dmu = 1,  dz/dlogvar = 0.5 * exp(0.5*logvar) * eps,  dz/deps = exp(0.5*logvar)
    dkl/dmu = mu,  dkl/dlogvar = 0.5 * (exp(logvar) - 1)
summed over the K samples inside the backward kernel.
gaussian_kl computes its gradients in the forward pass, while the inputs are in registers;
its backward is one multiply by the upstream gradient.

Plain eager calls of reparameterize_kl on the native backend take its C++ route (eager.cpp, with
its autograd in C++; see _reparameterize_kl_in_cpp), which computes what the Python route here does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastvae.backend import cpu_backend_name
from fastvae.ops import eager_extension, library
from fastvae.ops.common import (
    FusedOp,
    as_rows,
    as_sample_rows,
    composite_vjp,
    loss_dtype,
    no_grad_placeholder,
    rows_shape,
    sample_shape,
    scale_saved_grad,
    view_as_shape,
)
from fastvae.ops.gaussian.reference import kl_elements
from fastvae.ops.noise import draw_seed, philox_normal
from fastvae.ops.registry import implementation


# --------------------------------------------------------------------------- reparameterize_kl
def _seed_for(device: torch.device, eps: Optional[Tensor], seed: Optional[Tensor]) -> Tensor:
    """The seed the call uses (a new tensor: custom ops may not return their inputs)."""
    if eps is not None:
        return torch.zeros((), dtype=torch.int64, device=device)
    if seed is None:
        return draw_seed(device)
    return seed.detach().to(device, torch.int64).clone()


def _reparameterize_kl(
    mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor], samples: Optional[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """mu, logvar [B, ...], eps [B, ...] ([K, B, ...] with samples K) -> z [B, ...] ([K, B, ...])
    in mu's dtype, kl [B], the seed used ([] int64).

    With eps None, noise comes from `seed`, or from a seed drawn here when seed is None."""
    device = mu.device  # built once: each .device call makes a new torch.device
    seed_used = _seed_for(device, eps, seed)
    if mu.numel() == 0:
        z_shape = sample_shape(mu, samples)
        return mu.new_empty(z_shape), mu.new_zeros(mu.shape[:1], dtype=loss_dtype(mu, logvar)), seed_used
    kernel = implementation("gaussian", "reparameterize_kl_forward", device)
    eps_rows = None if eps is None else as_sample_rows(eps, samples)
    z, kl = kernel(as_rows(mu), as_rows(logvar), eps_rows, seed_used, 1 if samples is None else samples)
    return view_as_shape(z, sample_shape(mu, samples)), kl, seed_used


def reparameterize_kl_composite(
    mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor], samples: Optional[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """The same outputs from torch ops, differentiable by every autograd mode."""
    seed_used = _seed_for(mu.device, eps, seed)
    compute = loss_dtype(mu, logvar)
    shape = sample_shape(mu, samples)
    noise = eps.to(compute) if eps is not None else philox_normal(seed_used, shape, compute, mu.device)
    m, lv = mu.to(compute), logvar.to(compute)
    z = (m + torch.exp(0.5 * lv) * noise).to(mu.dtype)  # mu broadcast over the samples
    return z, kl_elements(m, lv).reshape(mu.shape[0], -1).sum(dim=1), seed_used


reparameterize_kl_op = torch.library.custom_op("fastvae::reparameterize_kl", _reparameterize_kl, mutates_args=())


@reparameterize_kl_op.register_fake
def _(
    mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor], samples: Optional[int]
) -> tuple[Tensor, Tensor, Tensor]:
    z = mu.new_empty(sample_shape(mu, samples))
    kl = mu.new_empty(mu.shape[:1], dtype=loss_dtype(mu, logvar))
    return z, kl, torch.empty((), dtype=torch.int64, device=mu.device)


def _reparameterize_kl_backward(
    grad_z: Optional[Tensor],
    grad_kl: Optional[Tensor],
    mu: Tensor,
    logvar: Tensor,
    eps: Optional[Tensor],
    seed: Tensor,
    samples: Optional[int],
) -> tuple[Tensor, Tensor]:
    """grad_z [B, ...] ([K, B, ...] with samples K) | None, grad_kl [B] | None -> grad_mu, grad_logvar
    (mu's and logvar's shape), summed over the samples."""
    if mu.numel() == 0:
        return torch.zeros_like(mu), torch.zeros_like(logvar)
    kernel = implementation("gaussian", "reparameterize_kl_backward", mu.device)
    grad_mu, grad_logvar = kernel(
        None if grad_z is None else as_sample_rows(grad_z, samples),
        grad_kl,
        as_rows(mu),
        as_rows(logvar),
        None if eps is None else as_sample_rows(eps, samples),
        seed,
        1 if samples is None else samples,
    )
    return view_as_shape(grad_mu, mu.shape), view_as_shape(grad_logvar, logvar.shape)


reparameterize_kl_backward_op = torch.library.custom_op(
    "fastvae::reparameterize_kl_backward", _reparameterize_kl_backward, mutates_args=()
)


@reparameterize_kl_backward_op.register_fake
def _(
    grad_z: Optional[Tensor],
    grad_kl: Optional[Tensor],
    mu: Tensor,
    logvar: Tensor,
    eps: Optional[Tensor],
    seed: Tensor,
    samples: Optional[int],
) -> tuple[Tensor, Tensor]:
    return (
        torch.empty_like(mu, memory_format=torch.contiguous_format),
        torch.empty_like(logvar, memory_format=torch.contiguous_format),
    )


def _no_composite(*args):
    raise RuntimeError(
        "fastvae::reparameterize_kl_backward has no derivative of its own: differentiate "
        "fastvae.reparameterize_kl, whose backward recomputes in torch ops when a graph is recorded"
    )


reparameterize_kl_backward_fused = FusedOp(reparameterize_kl_backward_op, _reparameterize_kl_backward, _no_composite)


def _reparameterize_kl_setup(ctx, inputs, output) -> None:
    mu, logvar, eps, _, samples = inputs
    ctx.samples = samples
    ctx.save_for_backward(mu, logvar, eps, output[2])
    # An output the caller did not use (kl of reparameterize(), or z when only kl is used)
    # arrives as None instead of zeros: the backward kernel skips its term.
    ctx.set_materialize_grads(False)


def _reparameterize_kl_grads(ctx, grad_z: Tensor | None, grad_kl: Tensor | None, _grad_seed: Tensor | None):
    mu, logvar, eps, seed = ctx.saved_tensors
    if grad_z is None and grad_kl is None:
        return None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: record a differentiable backward
        return tuple(
            composite_vjp(
                reparameterize_kl_composite,
                (mu, logvar, eps, seed, ctx.samples),
                (grad_z, grad_kl),
                ctx.needs_input_grad[:3] + (False, False),
            )
        )
    grad_mu = grad_logvar = grad_eps = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        # Eager (the Function route: nothing observes the forward op either), the backward op's
        # body runs directly; otherwise it is the custom op a trace or a mode records.
        backward_op = _reparameterize_kl_backward if getattr(ctx, "eager", False) else reparameterize_kl_backward_fused
        grad_mu, grad_logvar = backward_op(grad_z, grad_kl, mu, logvar, eps, seed, ctx.samples)
    if ctx.needs_input_grad[2] and grad_z is not None:
        # Rare (eps as a learned input): plain PyTorch is enough here (logvar broadcasts over the samples).
        compute = loss_dtype(grad_z, logvar)
        grad_eps = (grad_z.to(compute) * torch.exp(0.5 * logvar.to(compute))).to(eps.dtype)
    return grad_mu, grad_logvar, grad_eps, None, None


def _reparameterize_kl_in_cpp(
    mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[Tensor], samples: Optional[int]
) -> tuple[Tensor, Tensor, Tensor] | None:
    """A plain eager call through fastvae_eager::reparameterize_kl (eager.cpp: the same kernels with
    autograd in C++) when the native backend runs it and the call is the common form (noise drawn
    here, mu and logvar of one dtype); None for any other call, which the Python route takes."""
    if eps is not None or not mu.is_cpu or mu.dtype != logvar.dtype or mu.dtype not in library.DTYPE_CODES:
        return None
    # A native choice that cannot run is left to the Python route, which raises saying why.
    if cpu_backend_name() != "native" or library.load_error() is not None:
        return None
    operators = eager_extension.operators()
    return None if operators is None else operators.reparameterize_kl.default(mu, logvar, seed, samples)


# What eager.cpp's backward calls when a graph is being recorded (create_graph=True): the composite's
# differentiable backward, so that second derivatives are the composite's, as on the Python route.
_GRAPH_BACKWARD_LIBRARY = torch.library.Library("fastvae", "FRAGMENT")
_GRAPH_BACKWARD_LIBRARY.define(
    "reparameterize_kl_graph_backward(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor seed, "
    "int? samples, bool needs_mu, bool needs_logvar) -> (Tensor, Tensor)"
)


def _graph_backward(grad_z, grad_kl, mu, logvar, seed, samples, needs_mu, needs_logvar):
    grad_mu, grad_logvar, _, _, _ = composite_vjp(
        reparameterize_kl_composite,
        (mu, logvar, None, seed, samples),
        (grad_z, grad_kl),
        (needs_mu, needs_logvar, False, False, False),
    )
    # The schema returns two tensors; a gradient nobody asked for is zeros, which autograd drops.
    return (
        torch.zeros_like(mu) if grad_mu is None else grad_mu,
        torch.zeros_like(logvar) if grad_logvar is None else grad_logvar,
    )


_GRAPH_BACKWARD_LIBRARY.impl("reparameterize_kl_graph_backward", _graph_backward, "CompositeImplicitAutograd")


reparameterize_kl_fused = FusedOp(
    reparameterize_kl_op,
    _reparameterize_kl,
    reparameterize_kl_composite,
    _reparameterize_kl_setup,
    _reparameterize_kl_grads,
    work_elements=lambda mu, logvar, eps, seed, samples: mu.numel() * (samples or 1),
    eager_route=_reparameterize_kl_in_cpp,
)


# --------------------------------------------------------------------------- gaussian_kl
def _gaussian_kl(mu: Tensor, logvar: Tensor, elementwise: bool, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """mu, logvar [B, ...] -> kl (mu's shape if elementwise else [B]), dkl/dmu, dkl/dlogvar.

    The two gradients are empty tensors unless compute_grad."""
    if mu.numel() == 0:
        kl = mu.new_zeros(rows_shape(mu, elementwise), dtype=loss_dtype(mu, logvar))
        if compute_grad:
            return kl, torch.zeros_like(mu), torch.zeros_like(logvar)
        return kl, no_grad_placeholder(mu), no_grad_placeholder(logvar)
    kernel = implementation("gaussian", "gaussian_kl_forward", mu.device)
    kl, dmu, dlogvar = kernel(as_rows(mu), as_rows(logvar), elementwise, compute_grad)
    kl = view_as_shape(kl, rows_shape(mu, elementwise))
    if not compute_grad:
        return kl, no_grad_placeholder(mu), no_grad_placeholder(logvar)
    return kl, view_as_shape(dmu, mu.shape), view_as_shape(dlogvar, logvar.shape)


def gaussian_kl_composite(
    mu: Tensor, logvar: Tensor, elementwise: bool, compute_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The same outputs from torch ops, differentiable by every autograd mode."""
    compute = loss_dtype(mu, logvar)
    kl = kl_elements(mu.to(compute), logvar.to(compute))
    kl = kl if elementwise else kl.reshape(mu.shape[0], -1).sum(dim=1)
    if not compute_grad:
        return kl, no_grad_placeholder(mu), no_grad_placeholder(logvar)
    return kl, mu * 1, (0.5 * torch.expm1(logvar.to(compute))).to(logvar.dtype)


gaussian_kl_op = torch.library.custom_op("fastvae::gaussian_kl", _gaussian_kl, mutates_args=())


@gaussian_kl_op.register_fake
def _(mu: Tensor, logvar: Tensor, elementwise: bool, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    kl = mu.new_empty(rows_shape(mu, elementwise), dtype=loss_dtype(mu, logvar))
    if not compute_grad:
        return kl, no_grad_placeholder(mu), no_grad_placeholder(logvar)
    return (
        kl,
        torch.empty_like(mu, memory_format=torch.contiguous_format),
        torch.empty_like(logvar, memory_format=torch.contiguous_format),
    )


def _gaussian_kl_setup(ctx, inputs, output) -> None:
    mu, logvar, elementwise, compute_grad = inputs
    _, dmu, dlogvar = output
    ctx.compute_grad, ctx.elementwise = compute_grad, elementwise
    # No zero-filled gradients for the gradient outputs, which nothing differentiates.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(mu, logvar, dmu, dlogvar)


def _gaussian_kl_grads(ctx, grad_kl: Tensor | None, _grad_dmu: Tensor | None, _grad_dlogvar: Tensor | None):
    if grad_kl is None:  # only the gradient outputs were used: they carry no gradient
        return None, None, None, None
    mu, logvar, dmu, dlogvar = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: record a differentiable backward
        inputs = (mu, logvar, ctx.elementwise, False)
        return tuple(composite_vjp(gaussian_kl_composite, inputs, (grad_kl,), ctx.needs_input_grad[:2] + (False,) * 2))
    if not ctx.compute_grad:  # called directly with compute_grad=False, then differentiated
        _, dmu, dlogvar = gaussian_kl_fused(mu, logvar, ctx.elementwise, True)
    return scale_saved_grad(dmu, grad_kl), scale_saved_grad(dlogvar, grad_kl), None, None


gaussian_kl_fused = FusedOp(gaussian_kl_op, _gaussian_kl, gaussian_kl_composite, _gaussian_kl_setup, _gaussian_kl_grads)
