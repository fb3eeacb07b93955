"""fastvae::iwae_loss: the importance-weighted bound (Burda et al., ICLR 2016) as one custom op, with
the IWAE gradients or the doubly-reparameterized ones (DReG, Tucker et al., ICLR 2019).

The bound. For datapoint b, K samples z_k ~ q(z | x) = N(mu, exp(logvar)) (drawn by the caller,
e.g. fastvae.reparameterize(mu, logvar, samples=K)) and the decoder's output l_k on each:

    log w_k = log p(x | l_k) + log N(z_k; 0, I) - log N(z_k; mu, exp(logvar))
            = log p(x | l_k) + a_k,
      a_k   = 0.5 * sum_j [(z_kj - mu_j)^2 exp(-logvar_j) + logvar_j - z_kj^2]   (the log 2 pi cancel)
    loss    = -(logsumexp_k log w_k - log K)
    w~_k    = softmax_k(log w_k) = exp(log w_k - logsumexp_k log w_k), the normalized weights.

IWAE gradients: exactly the autograd of `loss` w.r.t. logits, z, mu and logvar as independent
inputs. With g = dL/dloss_b (the upstream gradient of the row) and c_k = -g w~_k:

    dL/dl_k      = c_k dlogp/dl_k                                (x - sigmoid(l_k) for Bernoulli)
    dL/dz_k      = c_k da_k/dz_k,          da/dz      = (z - mu) exp(-logvar) - z
    dL/dmu       = sum_k c_k da_k/dmu,     da/dmu     = -(z - mu) exp(-logvar)
    dL/dlogvar   = sum_k c_k da_k/dlogvar, da/dlogvar = 0.5 * (1 - (z - mu)^2 exp(-logvar))

The encoder's parameters phi then get, through z_k = mu + sigma eps_k and the direct terms,
    grad_phi = -sum_k w~_k [d log w_k/dz_k dz_k/dphi + d log w_k/dphi |z_k fixed],
    d log w_k/dphi |z_k fixed = -d log q(z_k)/dphi                    (the score function),
whose score-function term is noisy: its variance does not shrink as K grows.

DReG (estimator="dreg") reparameterizes that term a second time: for a reparameterizable q,
E[w~_k d log q(z_k)/dphi] = E[dw~_k/dz_k dz_k/dphi] with dw~_k/dz_k = (w~_k - w~_k^2) d log w_k/dz_k,
so the two terms together have the expectation of
    grad_phi DReG = -sum_k w~_k^2 d log w_k/dz_k dz_k/dphi,
an estimator without the score function, where d log w_k/dz_k is the whole derivative: through
the prior and posterior densities and through the decoder's likelihood. The decoder's
parameters theta keep the IWAE gradient, -sum_k w~_k d log p(x | z_k)/dtheta.

One backward pass gives both, in two steps:
    this op       the IWAE gradients for the logits and for z's direct terms (c_k da_k/dz_k),
                  and none for mu and logvar (the score function stopped);
    iwae_loss     a hook on z multiplies z's whole gradient by w~_k once more: the direct terms
                  and the decoder's path, which reaches z after the decoder's parameters have
                  taken their IWAE gradient from the logits'. Every path into z thus carries
                  w~_k^2, and the decoder's parameters w~_k: Tucker et al.'s estimator exactly.
So z must be the decoder's input (as fastvae.reparameterize returns it), and with DReG its
gradient is the estimator's, not the bound's.

Kernels. The likelihood family's forward kernel (LIKELIHOODS) scores the K * B rows of logits
against the data [B, D] as a row-periodic target (logits row k * B + b against x row b: the
data is never copied K times) and writes, in one pass over [K, B, D], the per-(k, b)
log-likelihoods and the unweighted gradient dlogp/dl. The weights need every sample's
log-likelihood, so they come after that pass, from this family's own kernels (reference.py
has their formulas): iwae_forward turns log p [K, B] and the latent [K, B, L] into the loss
rows and the normalized weights, iwae_backward gives z, mu and logvar their gradients, each
in one pass with the sums over the K samples in registers. (In torch ops the latent side was
a dozen small ops each way: 2.6 ms of backward at K = 50, B = 128, L = 32 on one core.)
Backward multiplies the saved likelihood gradient by c_k, in place where it may (an eager
call's first backward), and hands it over.
One pass over [K, B, D], not two: a second pass that wrote the weighted gradient directly
would save the backward's multiply (a read and a write of [K, B, D]) but reread the logits and
recompute their exponentials, and it would need a per-row weight the likelihood kernels do
not take: their contract is (logits, target, elementwise, compute_grad, weight) with one
scalar weight, shared by every likelihood family.

The likelihoods are fastvae.ops.likelihoods': with the row-periodic target contract every
kernel scores the samples as the Bernoulli's does. The Gaussian's also reads the decoder's
log-variance (decoder_logvar), as one row when it is shared, B rows when per datapoint or
K * B when per sample; its per-element gradient is weighted by c_kb and summed to its shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from fastvae.ops.common import (
    FusedOp,
    as_rows,
    as_sample_rows,
    composite_vjp,
    loss_dtype,
    no_grad_placeholder,
    scale_saved_grad,
    scale_saved_grad_,
    view_as_shape,
)
from fastvae.ops.iwae import reference
from fastvae.ops.likelihoods import LIKELIHOODS
from fastvae.ops.registry import implementation

ESTIMATORS = ("iwae", "dreg")


# --------------------------------------------------------------------------- scoring the samples; the composite
def _decoder_logvar_rows(decoder_logvar: Tensor, output: Tensor) -> Tensor:
    """The decoder's log-variance (broadcasting to output [K, B, ...]) as the Gaussian kernel reads it,
    rows whose count divides K * B: one row when it is shared by every sample and datapoint (a
    learned per-pixel or scalar log-variance), B rows when per datapoint, K * B when per sample."""
    data_dims = output.dim() - 2
    leading = decoder_logvar.shape[: max(decoder_logvar.dim() - data_dims, 0)]
    if all(size == 1 for size in leading):  # the same for every sample and datapoint
        shared = decoder_logvar.reshape(decoder_logvar.shape[len(leading) :]) if leading else decoder_logvar
        return as_rows(shared.expand(output.shape[2:]).unsqueeze(0))
    if len(leading) == 1 or (len(leading) == 2 and leading[0] == 1):  # per datapoint [B, ...] or [1, B, ...]
        per_datapoint = decoder_logvar.reshape(decoder_logvar.shape[len(leading) - 1 :])
        return as_rows(per_datapoint.expand(output.shape[1:]))
    return as_sample_rows(decoder_logvar.expand(output.shape), output.shape[0])


def _score(
    kernel: Callable, logits: Tensor, x: Tensor, decoder_logvar: Tensor | None, compute_grad: bool, compute: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """log p(x | logits) per sample and datapoint [K, B] (compute dtype), dlogp/dlogits (logits' shape)
    and, for a likelihood with the decoder's log-variance, dlogp/d(log-variance) per element
    (logits' shape, unreduced) from a likelihood kernel reading x [B, ...] row-periodically.
    The gradients are None unless compute_grad."""
    samples, batch = logits.shape[:2]
    if logits.numel() == 0:
        zeros = torch.zeros_like(logits) if compute_grad else None
        return logits.new_zeros((samples, batch), dtype=compute), zeros, zeros if decoder_logvar is not None else None
    rows, target = as_sample_rows(logits, samples), as_rows(x)
    if decoder_logvar is None:
        logp, dlogits = kernel(rows, target, False, compute_grad, 1.0)
        dlogvar = None
    else:
        logp, dlogits, dlogvar = kernel(
            rows, target, _decoder_logvar_rows(decoder_logvar, logits), False, compute_grad, 1.0
        )
    return (
        logp.view(samples, batch).to(compute),
        None if dlogits is None else dlogits.view(logits.shape),
        None if dlogvar is None else dlogvar.view(logits.shape),
    )


def _latent_rows(z: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """z [K, B, ...] as rows [K * B, L], mu and logvar [B, ...] as rows [B, L] (views where possible)."""
    return as_sample_rows(z, z.shape[0]), as_rows(mu), as_rows(logvar)


class _DReGBound(torch.autograd.Function):
    """The bound's rows and weights from log p [K, B] and the latent rows z [K * B, L], mu, logvar
    [B, L], with DReG's gradients: the reference kernels' formulas, in torch ops of the inputs
    (the weights are recomputed in backward), so a double backward differentiates the
    estimator's own formula. Reverse mode only: forward-mode AD has no DReG to compute."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logp: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
        return reference.iwae_forward(logp, z, mu, logvar)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_rows: Tensor, _grad_weights: Tensor):
        logp, z, mu, logvar = ctx.saved_tensors
        _, weights = reference.iwae_forward(logp, z, mu, logvar)
        grad_z, grad_mu, grad_logvar = reference.iwae_backward(grad_rows, weights, z, mu, logvar, dreg=True)
        return -grad_rows * weights, grad_z, grad_mu, grad_logvar  # log p keeps the IWAE weights


def iwae_loss_composite(
    logits: Tensor,
    x: Tensor,
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    decoder_logvar: Tensor | None,
    likelihood: str,
    estimator: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's outputs from torch ops (the reference kernels), differentiable by every autograd mode
    for the IWAE estimator and by reverse mode for DReG."""
    entry = LIKELIHOODS[likelihood]
    compute = loss_dtype(logits, x, z, mu, logvar, decoder_logvar)
    logp, dlogits, dlogvar = _score(entry.reference, logits, x, decoder_logvar, compute_grad, compute)
    bound = _DReGBound.apply if estimator == "dreg" else reference.iwae_forward
    rows, weights = bound(logp, *_latent_rows(z, mu, logvar))
    return (
        rows,
        weights,
        dlogits if compute_grad else no_grad_placeholder(logits),
        no_grad_placeholder(logits) if dlogvar is None else dlogvar,
    )


# --------------------------------------------------------------------------- the fused op
def _iwae_loss(
    logits: Tensor,
    x: Tensor,
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    decoder_logvar: Optional[Tensor],
    likelihood: str,
    estimator: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [K, B, ...], x [B, ...], z [K, B, ...], mu and logvar [B, ...], the decoder's
    log-variance (a Gaussian likelihood's, broadcasting to logits; else None) -> the loss rows [B],
    the normalized weights [K, B] (both in the compute dtype), dlogp/dlogits, unweighted, in the
    logits' shape and dtype (an empty tensor unless compute_grad; an eager call's backward scales
    it in place into the logits' gradient and hands it over), and dlogp/d(decoder log-variance)
    per element in the logits' shape (empty without one)."""
    entry = LIKELIHOODS[likelihood]
    compute = loss_dtype(logits, x, z, mu, logvar, decoder_logvar)
    samples, batch = logits.shape[:2]
    if batch == 0:
        dlogits = torch.zeros_like(logits) if compute_grad else no_grad_placeholder(logits)
        dlogvar = (
            torch.zeros_like(logits, dtype=_dlogvar_dtype(logits, decoder_logvar, compute))
            if compute_grad and decoder_logvar is not None
            else no_grad_placeholder(logits)
        )
        return logits.new_zeros(0, dtype=compute), logits.new_zeros((samples, 0), dtype=compute), dlogits, dlogvar
    logp, dlogits, dlogvar = _score(
        implementation(entry.family, entry.kernel, logits.device), logits, x, decoder_logvar, compute_grad, compute
    )
    rows, weights = implementation("iwae", "iwae_forward", logits.device)(logp, *_latent_rows(z, mu, logvar))
    return (
        rows,
        weights,
        dlogits if compute_grad else no_grad_placeholder(logits),
        # The kernel writes the log-variance's own dtype whenever it reads a row per scored row,
        # per datapoint with K = 1 included; the op's rule (and its fake) is _dlogvar_dtype's.
        no_grad_placeholder(logits) if dlogvar is None else dlogvar.to(_dlogvar_dtype(logits, decoder_logvar, compute)),
    )


def _dlogvar_dtype(logits: Tensor, decoder_logvar: Tensor, compute: torch.dtype) -> torch.dtype:
    """The Gaussian kernel's per-element dlogp/d(log-variance) dtype: the log-variance's own when it
    has a row per scored row, else the compute dtype (its sum must not be rounded first)."""
    return decoder_logvar.dtype if decoder_logvar.shape == logits.shape else compute


iwae_loss_op = torch.library.custom_op("fastvae::iwae_loss", _iwae_loss, mutates_args=())


@iwae_loss_op.register_fake
def _(
    logits: Tensor,
    x: Tensor,
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    decoder_logvar: Optional[Tensor],
    likelihood: str,
    estimator: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    compute = loss_dtype(logits, x, z, mu, logvar, decoder_logvar)
    rows = logits.new_empty(logits.shape[1:2], dtype=compute)
    weights = logits.new_empty(logits.shape[:2], dtype=compute)
    if not compute_grad:
        return rows, weights, no_grad_placeholder(logits), no_grad_placeholder(logits)
    dlogvar = (
        no_grad_placeholder(logits)
        if decoder_logvar is None
        else logits.new_empty(logits.shape, dtype=_dlogvar_dtype(logits, decoder_logvar, compute))
    )
    return rows, weights, torch.empty_like(logits, memory_format=torch.contiguous_format), dlogvar


def _setup(ctx, inputs, output) -> None:
    logits, x, z, mu, logvar, decoder_logvar, likelihood, estimator, compute_grad = inputs
    _, weights, dlogits, dlogvar = output
    ctx.likelihood, ctx.estimator, ctx.compute_grad = likelihood, estimator, compute_grad
    # Nothing differentiates through the weights or the gradient outputs: without this,
    # autograd hands backward zero-filled tensors for them on every call.
    ctx.set_materialize_grads(False)
    if getattr(ctx, "eager", False):
        # Eager, the logits' gradient output is kept on ctx: backward scales it in place and gives
        # it away (a saved tensor changed in place would fail a second backward's version check).
        ctx.mark_non_differentiable(weights, dlogits, dlogvar)
        ctx.dlogits = dlogits if compute_grad else None
        ctx.save_for_backward(logits, x, z, mu, logvar, decoder_logvar, weights, dlogvar)
    else:
        ctx.save_for_backward(logits, x, z, mu, logvar, decoder_logvar, weights, dlogvar, dlogits)


def _iwae_backward(
    grad_rows: Tensor, weights: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, dreg: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_rows [B], weights [K, B] -> grad_z [K, B, ...], grad_mu and grad_logvar (their inputs'
    shapes; zero for DReG)."""
    if weights.numel() == 0:
        return torch.zeros_like(z), torch.zeros_like(mu), torch.zeros_like(logvar)
    kernel = implementation("iwae", "iwae_backward", z.device)
    grads = kernel(grad_rows, weights, *_latent_rows(z, mu, logvar), dreg)
    return tuple(view_as_shape(g, t.shape) for g, t in zip(grads, (z, mu, logvar)))


iwae_backward_op = torch.library.custom_op("fastvae::iwae_backward", _iwae_backward, mutates_args=())


@iwae_backward_op.register_fake
def _(
    grad_rows: Tensor, weights: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, dreg: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (z, mu, logvar))


def _no_composite(*args):
    raise RuntimeError(
        "fastvae::iwae_backward has no derivative of its own: differentiate fastvae.iwae_loss, "
        "whose backward recomputes in torch ops when a graph is recorded"
    )


# A custom op of its own, so that a traced backward (torch.compile) sees one opaque node.
iwae_backward_fused = FusedOp(iwae_backward_op, _iwae_backward, _no_composite)


def _logits_grad(ctx, inputs: tuple, saved: list[Tensor], coef: Tensor) -> Tensor:
    """dL/dlogits = coef_kb * dlogp/dlogits from the forward's gradient (recomputed when the forward
    did not write it, or gave it away in an earlier backward of a retained graph)."""

    def recompute() -> Tensor:
        return iwae_loss_fused(*inputs[:8], True)[2]

    if saved:  # traced: a saved output must stay as it is
        return scale_saved_grad(saved[0] if ctx.compute_grad else recompute(), coef)
    dlogits, ctx.dlogits = ctx.dlogits, None
    # Ours to change: scaled in place, no second [K, B, D] buffer.
    return scale_saved_grad_(recompute() if dlogits is None else dlogits, coef)


def _decoder_logvar_grad(inputs: tuple, dlogvar: Tensor, coef: Tensor, compute_grad: bool) -> Tensor:
    """dL/d(decoder log-variance): coef_kb * dlogp/ds per element, summed in the compute dtype over
    the dims the log-variance broadcast along."""
    decoder_logvar = inputs[5]
    if not compute_grad:
        dlogvar = iwae_loss_fused(*inputs[:8], True)[3]
    per_element = coef.reshape(coef.shape + (1,) * (dlogvar.dim() - 2)) * dlogvar.to(coef.dtype)
    return per_element.sum_to_size(decoder_logvar.shape).to(decoder_logvar.dtype)


def _grads(
    ctx,
    grad_rows: Tensor | None,
    _grad_weights: Tensor | None,
    _grad_dlogits: Tensor | None,
    _grad_dlogvar: Tensor | None,
):
    none = (None,) * 9
    if grad_rows is None:  # only the weights or the gradient outputs were used: they carry no gradient
        return none
    logits, x, z, mu, logvar, decoder_logvar, weights, dlogvar, *saved = ctx.saved_tensors
    needs = ctx.needs_input_grad
    inputs = (logits, x, z, mu, logvar, decoder_logvar, ctx.likelihood, ctx.estimator, False)
    if torch.is_grad_enabled():  # create_graph=True: record a differentiable backward
        return tuple(
            composite_vjp(iwae_loss_composite, inputs, (grad_rows, None, None, None), needs[:6] + (False,) * 3)
        )
    grad_logits = grad_x = grad_z = grad_mu = grad_logvar = grad_decoder_logvar = None
    coef = -grad_rows.to(weights.dtype) * weights  # c_kb
    if needs[0]:
        grad_logits = _logits_grad(ctx, inputs, saved, coef)
    if needs[1]:  # the data's gradient (rare): from the likelihood's reference in torch ops
        grad_x = composite_vjp(
            iwae_loss_composite, inputs, (grad_rows, None, None, None), (False, True) + (False,) * 7
        )[1]
    if needs[2] or needs[3] or needs[4]:
        grad_z, grad_mu, grad_logvar = iwae_backward_fused(grad_rows, weights, z, mu, logvar, ctx.estimator == "dreg")
    if needs[5]:
        grad_decoder_logvar = _decoder_logvar_grad(inputs, dlogvar, coef, ctx.compute_grad)
    return grad_logits, grad_x, grad_z, grad_mu, grad_logvar, grad_decoder_logvar, None, None, None


iwae_loss_fused = FusedOp(iwae_loss_op, _iwae_loss, iwae_loss_composite, _setup, _grads)
