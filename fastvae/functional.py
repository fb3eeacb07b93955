"""The functions users call: validate once, pick the reduction, call the fused op.

Shapes: dim 0 is the batch B; every other dim belongs to one datapoint, so
`[B, D]` vectors and `[B, C, H, W]` images both work. Losses come back in
float32 (float64 for float64 inputs), whatever the input dtypes.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fastvae import ops
from fastvae.ops.elbo import NegativeELBO, fuses_eagerly, negative_elbo_value
from fastvae.ops.reparameterize_kl import draw_seed

REDUCTIONS = ("none", "sum", "mean", "batchmean")


# --------------------------------------------------------------------------- validation
def _check_float_tensor(name: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or "
                        f"float64), got {t.dtype}; convert it with {name}.float()")
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-d tensor; "
                         f"use {name}.reshape(1, -1) for a single datapoint")


def _check_same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} {list(a.shape)} and {b_name} {list(b.shape)} must have the same shape")


def _check_same_device(**tensors: Tensor) -> None:
    first, *rest = tensors.values()
    if all(t.device == first.device for t in rest):
        return
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}; move them with .to(device)")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(map(repr, REDUCTIONS))}")


def _check_pair(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    _check_float_tensor(a_name, a)
    _check_float_tensor(b_name, b)
    _check_same_shape(a_name, a, b_name, b)
    _check_same_device(**{a_name: a, b_name: b})


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _reduction_weight(reduction: str, batch: int, elements: int) -> float:
    """What _reduce_rows weights each row by: 1 for "sum", 1/elements for "mean", 1/B for "batchmean"."""
    if reduction == "sum":
        return 1.0
    return 1.0 / max(elements if reduction == "mean" else batch, 1)


def _reduce_rows(rows: Tensor, reduction: str, elements: int) -> Tensor:
    """Reduce per-datapoint sums [B]: "mean" divides by `elements`, "batchmean" by B; empty gives 0.

    A division, not a multiply by _reduction_weight: with `rows.sum() * 1.0` in the
    fastvae-train step, the inductor-compiled graph (torch 2.14.1, CPU, AMP) aborted with
    glibc heap corruption; this form, the one fastvae used before, does not."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / max(elements, 1)
    return rows.sum() / max(rows.shape[0], 1)


# --------------------------------------------------------------------------- sampling
def reparameterize_kl(mu: Tensor, logvar: Tensor, eps: Tensor | None = None, *,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sample z ~ q(z|x) = N(mu, exp(logvar)) and its KL to N(0, I), in one fused pass.

    Args:
        mu, logvar: [B, ...] mean and log-variance of q(z|x), any float dtype.
        eps: optional [B, ...] standard-normal noise; when None the kernel draws it
            (Philox, seeded from `generator` or torch's default, so torch.manual_seed
            reproduces it) and regenerates it in backward rather than storing it.
    Returns:
        z [B, ...] in mu's dtype, z = mu + exp(0.5*logvar) * eps; and
        kl [B] float32, sum over each datapoint of 0.5*(mu^2 + exp(logvar) - logvar - 1).
    """
    _check_pair("mu", mu, "logvar", logvar)
    if eps is not None:
        _check_float_tensor("eps", eps)
        _check_same_shape("eps", eps, "mu", mu)
        _check_same_device(mu=mu, eps=eps)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    seed = draw_seed(generator) if (generator is not None and eps is None) else None
    z, kl, _ = ops.reparameterize_kl(mu, logvar, eps, seed)
    return z, kl


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor | None = None, *,
                   generator: torch.Generator | None = None) -> Tensor:
    """z = mu + exp(0.5*logvar) * eps, [B, ...] in mu's dtype; see reparameterize_kl.

    It runs the same kernel: the KL costs no extra read, only a [B] write."""
    return reparameterize_kl(mu, logvar, eps, generator=generator)[0]


# --------------------------------------------------------------------------- losses
def gaussian_kl(mu: Tensor, logvar: Tensor, reduction: str = "batchmean") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) = 0.5*(mu^2 + exp(logvar) - logvar - 1) per element.

    Args:
        mu, logvar: [B, ...].
        reduction: "none" (elementwise, mu's shape), "sum", "mean" (over all elements)
            or "batchmean" (sum / B).
    """
    _check_pair("mu", mu, "logvar", logvar)
    _check_reduction(reduction)
    elementwise = reduction == "none"
    kl, _, _ = ops.gaussian_kl(mu, logvar, elementwise, _needs_grad(mu, logvar))
    return kl if elementwise else _reduce_rows(kl, reduction, mu.numel())


def bernoulli_log_likelihood(logits: Tensor, target: Tensor, reduction: str = "batchmean") -> Tensor:
    """log p(target | logits) = target*logits - softplus(logits), <= 0, stable for any logits.

    Args:
        logits: [B, ...] Bernoulli logits (a decoder's output).
        target: [B, ...] in [0, 1], binary or continuous (grey levels).
        reduction: "none" (elementwise, logits' shape), "sum", "mean" (over all
            elements) or "batchmean" (sum / B).
    """
    _check_pair("logits", logits, "target", target)
    _check_reduction(reduction)
    needs_grad = _needs_grad(logits)
    if reduction == "none":
        return ops.bernoulli_log_likelihood(logits, target, True, needs_grad, None)[0]
    weight = _reduction_weight(reduction, logits.shape[0], logits.numel())
    return _reduce_rows(ops.bernoulli_log_likelihood(logits, target, False, needs_grad, weight)[0],
                        reduction, logits.numel())


def _check_elbo_inputs(logits: Tensor, target: Tensor, mu: Tensor, logvar: Tensor) -> None:
    _check_pair("logits", logits, "target", target)
    _check_pair("mu", mu, "logvar", logvar)
    _check_same_device(logits=logits, mu=mu)
    if logits.shape[0] != mu.shape[0]:
        raise ValueError(f"logits {list(logits.shape)} and mu {list(mu.shape)} must have the same "
                         f"batch size (dim 0): one latent row per datapoint")


def _check_kl_rows(kl: Tensor, logits: Tensor) -> None:
    _check_float_tensor("kl", kl)
    _check_same_device(logits=logits, kl=kl)
    if kl.shape != logits.shape[:1]:
        raise ValueError(f"kl must be the per-datapoint KL [B] = [{logits.shape[0]}] (as reparameterize_kl "
                         f"returns it), got {list(kl.shape)}")


def elbo_terms(logits: Tensor, target: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """Per-datapoint reconstruction term -log p(x|z) [B] and KL [B], both float32."""
    _check_elbo_inputs(logits, target, mu, logvar)
    logp, _ = ops.bernoulli_log_likelihood(logits, target, False, _needs_grad(logits), None)
    kl, _, _ = ops.gaussian_kl(mu, logvar, False, _needs_grad(mu, logvar))
    return -logp, kl


def elbo_loss(logits: Tensor, target: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None, *,
              kl: Tensor | None = None, beta: float | Tensor = 1.0, reduction: str = "batchmean") -> Tensor:
    """The negative ELBO, -log p(x|z) + beta * KL(q(z|x) || N(0, I)), per datapoint then reduced.

    Args:
        logits, target: [B, ...] decoder logits and data in [0, 1].
        mu, logvar: [B, ...] the encoder's q(z|x), same B; or instead
        kl: [B] the per-datapoint KL that reparameterize_kl returned with z, so that
            it is not computed a second time.
        beta: KL weight (beta-VAE; a tensor avoids recompiles under torch.compile when it changes).
        reduction: "none" (per datapoint [B]), "sum", "mean" or "batchmean" (both: over datapoints).
    """
    _check_reduction(reduction)
    if isinstance(beta, numbers.Real) and beta < 0:
        raise ValueError(f"beta must be >= 0 (it weights the KL term), got {beta}")
    if not isinstance(beta, (numbers.Real, Tensor)):
        raise TypeError(f"beta must be a float or a tensor, got {type(beta).__name__}")
    if kl is None:
        if mu is None or logvar is None:
            raise TypeError("elbo_loss needs the posterior: pass mu and logvar, or kl= (the [B] KL that "
                            "fastvae.reparameterize_kl returns)")
        _check_elbo_inputs(logits, target, mu, logvar)
        kl, _, _ = ops.gaussian_kl(mu, logvar, False, _needs_grad(mu, logvar))
    else:
        if mu is not None or logvar is not None:
            raise TypeError("elbo_loss takes mu and logvar or kl=, not both: the KL would count twice")
        _check_pair("logits", logits, "target", target)
        _check_kl_rows(kl, logits)
    if reduction == "none":
        return -_log_likelihood_rows(logits, target, None) + beta * kl
    divisor = 1 if reduction == "sum" else max(logits.shape[0], 1)
    if fuses_eagerly(logits, target, kl, beta):
        return NegativeELBO.apply(logits, target, kl, beta, divisor)[0]
    # Traced: the Bernoulli op weighted by d(loss)/d(sum log p) = -1/divisor (its saved gradient
    # is then the loss's), one sum per term and the loss's few ops, for inductor to fuse.
    logp = _log_likelihood_rows(logits, target, -1.0 / divisor)
    return negative_elbo_value(logp.sum(), kl.sum(), beta, divisor)


def _log_likelihood_rows(logits: Tensor, target: Tensor, weight: float | None) -> Tensor:
    """log p(x | logits) per datapoint [B], for a loss that adds `weight` * its sum.

    With the weight (for example -1/B for the mean negative log-likelihood) the kernel writes
    weight * dlogp/dlogits in the forward pass; when backward then receives the weight itself,
    broadcast (what loss.backward() gives when the loss is written so), that saved gradient is
    d(loss)/d(logits) and is handed over with no pass over [B, D]. Any other upstream gradient
    is still exact, at the cost of that pass. The caller checks the inputs (elbo_loss, and
    fastvae-train's objective, whose model makes logits of the data's shape)."""
    return ops.bernoulli_log_likelihood(logits, target, False, _needs_grad(logits), weight)[0]
