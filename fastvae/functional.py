"""The functions users call: validate once, pick the reduction, call the fused op.

Shapes: dim 0 is the batch B; every other dim belongs to one datapoint, so `[B, D]`
vectors and `[B, C, H, W]` images both work. Losses come back in float32 (float64 for
float64 inputs), whatever the input dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae import validation as check
from fastvae.ops.common import transform_active
from fastvae.ops.gaussian.op import gaussian_kl_fused, reparameterize_kl_fused
from fastvae.ops.iwae.op import ESTIMATORS, iwae_loss_fused
from fastvae.ops.likelihoods import LIKELIHOODS
from fastvae.ops.noise import draw_seed


def _needs_grad(*tensors: Tensor | None) -> bool:
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, not any(genexpr): this runs on every call
            if t is not None and t.requires_grad:
                return True
    return False


def _reduction_divisor(reduction: str, rows: Tensor, elements: int) -> int:
    """What a reduction divides the rows' sum by: 1 for "sum", elements for "mean", B for
    "batchmean" (1 for an empty batch, whose reductions are 0); a SymInt under torch.compile."""
    if reduction == "sum":
        return 1
    return max(elements if reduction == "mean" else rows.shape[0], 1)


def _reduce_rows(rows: Tensor, reduction: str, elements: int) -> Tensor:
    """Per-datapoint sums [B] reduced: "sum", "mean" (over `elements`) or "batchmean" (over B).

    The division's gradient reaches the rows as 1/divisor broadcast, which is what the
    likelihood ops recognise as their weight (fastvae.ops.common.is_the_weight)."""
    total = rows.sum()
    return total if reduction == "sum" else total / _reduction_divisor(reduction, rows, elements)


# --------------------------------------------------------------------------- sampling
def reparameterize_kl(
    mu: Tensor,
    logvar: Tensor,
    eps: Tensor | None = None,
    *,
    samples: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample z ~ q(z|x) = N(mu, exp(logvar)) and its KL to N(0, I), in one fused pass.

    Args:
        mu, logvar: [B, ...] mean and log-variance of q(z|x), any float dtype
            (`mu, logvar = h.chunk(2, dim=1)` costs no copy).
        eps: optional standard-normal noise, [B, ...] ([K, B, ...] with samples=K). When
            None the kernel draws it (Philox, seeded from `generator` or torch's default
            generator of mu's device, so torch.manual_seed reproduces it) and regenerates it
            in backward rather than storing it.
        samples: K, to draw K samples per datapoint (importance-weighted bounds, see
            iwae_loss): z gets a leading samples dim. mu and logvar are read in place for
            every sample, never copied K times, and backward sums the K samples' gradients
            inside the kernel. The noise of z[k, b] is what the rows k * B + b of a K * B-row
            call would draw. None (the default): one sample, z [B, ...].
        generator: a torch.Generator for the seed of the noise.

    Returns:
        z: [B, ...] ([K, B, ...] with samples=K) in mu's dtype, mu + exp(0.5 * logvar) * eps.
        kl: [B] float32, per datapoint sum of 0.5 * (mu^2 + exp(logvar) - logvar - 1).

    Example:
        >>> mu, logvar = encoder(x).chunk(2, dim=1)          # [B, 32] each
        >>> z, kl = fastvae.reparameterize_kl(mu, logvar)    # z [B, 32], kl [B]
        >>> loss = fastvae.elbo_loss(decoder(z), x, kl=kl)
        >>> z, _ = fastvae.reparameterize_kl(mu, logvar, samples=5)   # z [5, B, 32]
    """
    check.check_pair("mu", mu, "logvar", logvar)
    check.check_samples(samples)
    if eps is not None:
        check.check_float_tensor("eps", eps)
        check.check_same_device(mu=mu, eps=eps)
        if samples is None:
            check.check_same_shape("eps", eps, "mu", mu)
        elif eps.shape != (samples,) + mu.shape:
            raise ValueError(
                f"eps {list(eps.shape)} must have shape [samples, *mu.shape] = "
                f"{[samples, *mu.shape]} with samples={samples}"
            )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    seed = draw_seed(mu.device, generator) if (generator is not None and eps is None) else None
    z, kl, _ = reparameterize_kl_fused(mu, logvar, eps, seed, samples)
    return z, kl


def reparameterize(
    mu: Tensor,
    logvar: Tensor,
    eps: Tensor | None = None,
    *,
    samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """z = mu + exp(0.5 * logvar) * eps in mu's dtype, [B, ...] ([K, B, ...] with samples=K); the
    arguments of reparameterize_kl.

    It runs the same kernel: the KL costs no extra read, only a [B] write.

    Example:
        >>> z = fastvae.reparameterize(mu, logvar)              # z ~ N(mu, exp(logvar)), [B, L]
        >>> zs = fastvae.reparameterize(mu, logvar, samples=5)  # 5 samples per datapoint, [5, B, L]
    """
    return reparameterize_kl(mu, logvar, eps, samples=samples, generator=generator)[0]


# --------------------------------------------------------------------------- losses
def gaussian_kl(mu: Tensor, logvar: Tensor, reduction: str = "batchmean") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) = 0.5 * (mu^2 + exp(logvar) - logvar - 1) per element.

    Args:
        mu, logvar: [B, ...].
        reduction: "none" (elementwise, mu's shape), "sum", "mean" (over all elements) or
            "batchmean" (sum / B, the default).

    Returns:
        The KL in float32 (float64 for float64 inputs): mu's shape, or a scalar.

    Example:
        >>> kl = fastvae.gaussian_kl(mu, logvar)                       # mean over the batch
        >>> per_dim = fastvae.gaussian_kl(mu, logvar, "none").mean(0)  # [L], e.g. for free bits
    """
    check.check_pair("mu", mu, "logvar", logvar)
    check.check_reduction(reduction)
    elementwise = reduction == "none"
    kl, _, _ = gaussian_kl_fused(mu, logvar, elementwise, _needs_grad(mu, logvar))
    return kl if elementwise else _reduce_rows(kl, reduction, mu.numel())


def _log_likelihood(
    likelihood: str,
    output: Tensor,
    target: Tensor,
    decoder_logvar: Tensor | None,
    elementwise: bool,
    weight_divisor: int | None,
    target_name: str = "target",
    check_target: bool = True,
) -> Tensor:
    """log p(target | output) of `likelihood` (fastvae.ops.likelihoods), per element or per datapoint
    [B] for a loss that adds their sum / weight_divisor (its kernel writes the gradient so
    scaled, see fastvae.ops.common.rows_weight).

    A target outside [0, 1] of a likelihood from logits is a ValueError naming target_name where
    that can be checked for free (_check_target_range), NaN elsewhere; check_target False leaves
    that check to the caller, which passes it a sum it computes anyway."""
    entry = LIKELIHOODS[likelihood]
    if entry.takes_logvar:
        return entry.fused(
            output, target, decoder_logvar, elementwise, _needs_grad(output, decoder_logvar), weight_divisor
        )[0]
    result = entry.fused(output, target, elementwise, _needs_grad(output), weight_divisor)[0]
    if check_target:
        _check_target_range(likelihood, target_name, result, target)
    return result


def _check_target_range(likelihood: str, target_name: str, value: Tensor, target: Tensor) -> None:
    """For a likelihood whose data lie in [0, 1]: a target outside it is a ValueError naming
    target_name where values are readable. `value` is the op's output or a sum of it (NaN wherever
    a target was out of range); a sum the caller computes anyway costs one value read."""
    if LIKELIHOODS[likelihood].target_in_unit_interval:
        check.check_unit_interval(target_name, value, target)


def _reduced_log_likelihood(
    likelihood: str,
    output: Tensor,
    target: Tensor,
    decoder_logvar: Tensor | None,
    reduction: str,
    target_name: str = "target",
) -> Tensor:
    """_log_likelihood per element for "none", else the per-datapoint rows reduced; their kernel is
    told the reduction's divisor, so that backward can hand its gradient over."""
    if reduction == "none":
        return _log_likelihood(likelihood, output, target, decoder_logvar, True, None, target_name)
    divisor = _reduction_divisor(reduction, output, output.numel())
    rows = _log_likelihood(likelihood, output, target, decoder_logvar, False, divisor, check_target=False)
    reduced = _reduce_rows(rows, reduction, output.numel())
    _check_target_range(likelihood, target_name, reduced, target)
    return reduced


def bernoulli_log_likelihood(logits: Tensor, target: Tensor, reduction: str = "batchmean") -> Tensor:
    """log p(target | logits) = target * logits - softplus(logits) <= 0, stable for any logits.

    Args:
        logits: [B, ...] Bernoulli logits (a decoder's output).
        target: [B, ...] in [0, 1], binary or grey levels. Values outside are a ValueError on
            CPU tensors (see fastvae.set_validate_args) and NaN elsewhere.
        reduction: "none" (elementwise, logits' shape), "sum", "mean" (over all elements) or
            "batchmean" (sum / B, the default).

    Returns:
        log p in float32 (float64 for float64 inputs): logits' shape, or a scalar.

    Example:
        >>> logp = fastvae.bernoulli_log_likelihood(decoder(z), x)     # mean over the batch
        >>> loss = -logp + fastvae.gaussian_kl(mu, logvar)
    """
    check.check_pair("logits", logits, "target", target)
    check.check_reduction(reduction)
    return _reduced_log_likelihood("bernoulli", logits, target, None, reduction)


def continuous_bernoulli_log_likelihood(logits: Tensor, x: Tensor, *, reduction: str = "batchmean") -> Tensor:
    """log p(x | logits) of the continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019), a density on [0, 1]:
    x * logits - softplus(logits) + log C(logits), C(l) = l / tanh(l / 2) (2 at l = 0).

    Accurate for every finite logit: a series near 0 (where the closed form is 0/0) and
    closed forms without overflow for large |logits| (torch.distributions.ContinuousBernoulli
    is off by about 1% at |logits| = 30 to 80).

    Args:
        logits: [B, ...] the decoder's output.
        x: [B, ...] the data in [0, 1] (grey levels: the density's support). Values outside are a
            ValueError on CPU tensors (see fastvae.set_validate_args) and NaN elsewhere.
        reduction: "none" (elementwise, logits' shape), "sum", "mean" (over all elements) or
            "batchmean" (sum / B, the default).

    Returns:
        log p in float32 (float64 for float64 inputs): logits' shape, or a scalar. A density:
        it may be positive.

    Example:
        >>> logp = fastvae.continuous_bernoulli_log_likelihood(decoder(z), x)   # x in [0, 1]
        >>> loss = -logp + fastvae.gaussian_kl(mu, logvar)
    """
    check.check_pair("logits", logits, "x", x)
    check.check_reduction(reduction)
    return _reduced_log_likelihood("continuous_bernoulli", logits, x, None, reduction, target_name="x")


def gaussian_log_likelihood(
    mean: Tensor, x: Tensor, logvar: Tensor | None = None, *, reduction: str = "batchmean"
) -> Tensor:
    """log N(x; mean, exp(logvar)) = -0.5 * ((x - mean)^2 * exp(-logvar) + logvar + log 2pi) per element.

    Args:
        mean: [B, ...] the decoder's mean.
        x: [B, ...] the data, any real values.
        logvar: the log-variance: None for unit variance; [B, ...] (a decoder output); or any
            shape that broadcasts to x's, such as a learned scalar [] or per-feature [D] or
            [1, C, 1, 1] parameter, whose gradient is summed over the broadcast dims (in
            float32) and which is never expanded to [B, ...].
        reduction: "none" (elementwise, mean's shape), "sum", "mean" (over all elements) or
            "batchmean" (sum / B, the default).

    Returns:
        log p in float32 (float64 for float64 inputs): mean's shape, or a scalar. A density:
        it may be positive.

    Example:
        >>> mean, logvar = decoder(z).chunk(2, dim=1)                     # [B, D] each
        >>> logp = fastvae.gaussian_log_likelihood(mean, x, logvar)       # mean over the batch
        >>> logp = fastvae.gaussian_log_likelihood(mean, x, log_sigma2)   # a learned [] or [D]
    """
    check.check_pair("mean", mean, "x", x)
    check.check_reduction(reduction)
    if logvar is not None:
        check.check_broadcastable("logvar", logvar, "x", x)
    return _reduced_log_likelihood("gaussian", mean, x, logvar, reduction)


def _check_posterior(logits: Tensor, mu: Tensor, logvar: Tensor) -> None:
    check.check_pair("mu", mu, "logvar", logvar)
    check.check_same_device(logits=logits, mu=mu)
    check.check_same_batch("logits", logits, "mu", mu, "one latent row per datapoint")


def _check_kl_rows(kl: Tensor, logits: Tensor) -> None:
    if (
        isinstance(kl, Tensor)
        and kl.is_floating_point()
        and kl.device == logits.device
        and kl.shape == logits.shape[:1]
    ):
        return  # the common case in one expression; the checks below name what is wrong
    check.check_float_tensor("kl", kl)
    check.check_same_device(logits=logits, kl=kl)
    if kl.shape != logits.shape[:1]:
        raise ValueError(
            f"kl must be the per-datapoint KL [B] = [{logits.shape[0]}] (as reparameterize_kl "
            f"returns it), got {list(kl.shape)}"
        )


def _check_decoder(logits: Tensor, target: Tensor, likelihood: str, decoder_logvar: Tensor | None) -> None:
    check.check_pair("logits", logits, "target", target)
    check.check_likelihood(likelihood, decoder_logvar)
    if decoder_logvar is not None:
        check.check_broadcastable("decoder_logvar", decoder_logvar, "target", target)


def elbo_terms(
    logits: Tensor,
    target: Tensor,
    mu: Tensor,
    logvar: Tensor,
    *,
    likelihood: str = "bernoulli",
    decoder_logvar: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The two terms of the negative ELBO per datapoint: -log p(x|z) [B] and KL [B], float32;
    the arguments of elbo_loss.

    Example:
        >>> recon, kl = fastvae.elbo_terms(decoder(z), x, mu, logvar)
        >>> print(f"recon {recon.mean():.1f} nats, KL {kl.mean():.1f} nats")
    """
    _check_decoder(logits, target, likelihood, decoder_logvar)
    _check_posterior(logits, mu, logvar)
    logp = _log_likelihood(likelihood, logits, target, decoder_logvar, False, None)
    kl, _, _ = gaussian_kl_fused(mu, logvar, False, _needs_grad(mu, logvar))
    return -logp, kl


def elbo_loss(
    logits: Tensor,
    target: Tensor,
    mu: Tensor | None = None,
    logvar: Tensor | None = None,
    *,
    kl: Tensor | None = None,
    beta: float | Tensor = 1.0,
    reduction: str = "batchmean",
    likelihood: str = "bernoulli",
    decoder_logvar: Tensor | None = None,
) -> Tensor:
    """The negative ELBO, -log p(x|z) + beta * KL(q(z|x) || N(0, I)), per datapoint then reduced.

    Args:
        logits: [B, ...] the decoder's output on z ~ q(z|x): the logits of p(x|z), or its mean
            for likelihood="gaussian".
        target: [B, ...] the data x: in [0, 1] for the likelihoods from logits, any real values
            for the Gaussian.
        mu, logvar: [B, L] the encoder's q(z|x), same B; or instead
        kl: [B] the per-datapoint KL that reparameterize_kl returned with z, so that it is
            not computed a second time.
        beta: the KL's weight (beta-VAE, KL warm-up): a finite float >= 0, or a 0-d tensor
            (which avoids recompiles under torch.compile when it changes).
        reduction: "none" (per datapoint, [B]), "sum", "mean" or "batchmean" (both: the mean
            over datapoints, the default).
        likelihood: p(x|z): "bernoulli" (the default), "continuous_bernoulli" (both from
            logits) or "gaussian" (a mean, see gaussian_log_likelihood).
        decoder_logvar: the Gaussian's log-variance, [B, ...] or anything that broadcasts to
            target's shape (a learned scalar or per-feature parameter); None: unit variance.
            Only with likelihood="gaussian".

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or [B].

    Example:
        >>> z, kl = fastvae.reparameterize_kl(mu, logvar)
        >>> loss = fastvae.elbo_loss(decoder(z), x, kl=kl, beta=0.5)
        >>> loss = fastvae.elbo_loss(mean, x, kl=kl, likelihood="gaussian", decoder_logvar=log_sigma2)
    """
    check.check_reduction(reduction)
    _check_decoder(logits, target, likelihood, decoder_logvar)
    check.check_beta(beta, logits.device)
    if kl is None:
        if mu is None or logvar is None:
            raise TypeError(
                "elbo_loss needs the posterior: pass mu and logvar, or kl= (the [B] KL that "
                "fastvae.reparameterize_kl returns)"
            )
        _check_posterior(logits, mu, logvar)
        kl, _, _ = gaussian_kl_fused(mu, logvar, False, _needs_grad(mu, logvar))
    else:
        if mu is not None or logvar is not None:
            raise TypeError("elbo_loss takes mu and logvar or kl=, not both: the KL would count twice")
        _check_kl_rows(kl, logits)
    if reduction == "none":
        return -_log_likelihood(likelihood, logits, target, decoder_logvar, False, None) + beta * kl
    divisor = 1 if reduction == "sum" else max(logits.shape[0], 1)
    # The likelihood's kernel is told the loss's weight on it, -1/divisor: its saved gradient
    # then is d(loss)/d(logits), and loss.backward() hands it over with no pass over [B, D].
    logp = _log_likelihood(likelihood, logits, target, decoder_logvar, False, -divisor, check_target=False)
    logp_sum = logp.sum()
    _check_target_range(likelihood, "target", logp_sum, target)
    weighted_kl = kl.sum() if isinstance(beta, (int, float)) and beta == 1 else beta * kl.sum()
    loss = weighted_kl - logp_sum
    return loss if divisor == 1 else loss / divisor


# --------------------------------------------------------------------------- importance-weighted bound
def _check_iwae_inputs(logits: Tensor, x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> None:
    """Shapes (K, B, D, L), dtypes and devices of iwae_loss's tensors, each error naming its argument."""
    for name, t in (("logits", logits), ("x", x), ("z", z), ("mu", mu), ("logvar", logvar)):
        check.check_float_tensor(name, t)
    for name, t in (("logits", logits), ("z", z)):
        if t.dim() < 2:
            raise ValueError(
                f"{name} must be [K, B, ...], K samples of B datapoints (z from "
                f"fastvae.reparameterize(mu, logvar, samples=K)), got shape {list(t.shape)}"
            )
    samples, batch = logits.shape[:2]
    if samples == 0:
        raise ValueError(f"logits {list(logits.shape)} has no sample (K = 0 in dim 0); the bound needs K >= 1")
    if z.shape[0] != samples:
        raise ValueError(
            f"z {list(z.shape)} and logits {list(logits.shape)} must have the same number of samples K (dim 0)"
        )
    if z.shape[1] != batch:
        raise ValueError(f"z {list(z.shape)} and logits {list(logits.shape)} must have the same batch size B (dim 1)")
    if x.shape != logits.shape[1:]:
        axis = "batch size B (dim 0)" if x.dim() == 0 or x.shape[0] != batch else "data shape D"
        raise ValueError(
            f"x {list(x.shape)} must have the shape {list(logits.shape[1:])} of one sample of "
            f"logits {list(logits.shape)}: its {axis} differs"
        )
    if mu.shape != z.shape[1:]:
        axis = "batch size B (dim 0)" if mu.dim() == 0 or mu.shape[0] != batch else "latent shape L"
        raise ValueError(
            f"mu {list(mu.shape)} must have the shape {list(z.shape[1:])} of one sample of "
            f"z {list(z.shape)}: its {axis} differs"
        )
    check.check_same_shape("logvar", logvar, "mu", mu)
    check.check_same_device(logits=logits, x=x, z=z, mu=mu, logvar=logvar)


_DREG_FIRST_ORDER_ONLY = (
    "estimator='dreg' defines first-order gradients (an estimator, not the derivative of "
    "a function), so it has no double backward and no torch.func transform; differentiate "
    "the bound itself with estimator='iwae' for those"
)
# Before this torch, dynamo mistraces a gradient hook on an intermediate tensor that captures a
# tensor of the graph (the one DReG puts on z): the compiled graph refers to a value it never
# defines. Checked: torch 2.11 fails, 2.14 works.
DREG_COMPILE_MIN_TORCH = (2, 14)
_DREG_COMPILE_NEEDS_NEWER_TORCH = (
    f"iwae_loss(estimator='dreg') inside torch.compile needs torch >= "
    f"{'.'.join(map(str, DREG_COMPILE_MIN_TORCH))} (this is torch {torch.__version__}, whose dynamo "
    "mistraces the gradient hook DReG puts on z); call the DReG loss outside torch.compile, or use "
    "estimator='iwae'"
)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _weight_z_gradient(z: Tensor, weights: Tensor) -> None:
    """DReG's second weighting (fastvae.ops.iwae.op): z's whole gradient, the decoder's path included,
    times the normalized weights w~ [K, B] (constants of the estimator), with a hook on z."""
    if getattr(z, "_fastvae_dreg_weighted", False):
        raise ValueError(
            "iwae_loss(estimator='dreg') was already applied to this z, whose gradient would be "
            "weighted twice (a leaf z keeps the weighting for every later graph). Draw fresh samples "
            "for each bound, pass a z computed from mu and logvar, or use estimator='iwae'"
        )
    scale = weights.detach().reshape(weights.shape + (1,) * (z.dim() - weights.dim()))

    def weight(grad: Tensor) -> Tensor:
        # create_graph=True: a later backward would meet this hook again. (Traced, the hook is
        # recorded with grad mode on; compiled graphs have no double backward anyway.)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(_DREG_FIRST_ORDER_ONLY)
        return (grad * scale).to(grad.dtype)

    z.register_hook(weight)
    if not torch.compiler.is_compiling():
        z._fastvae_dreg_weighted = True


def iwae_loss(
    logits: Tensor,
    x: Tensor,
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    *,
    likelihood: str = "bernoulli",
    estimator: str = "iwae",
    reduction: str = "batchmean",
    decoder_logvar: Tensor | None = None,
) -> Tensor:
    """The negative importance-weighted bound (IWAE, Burda et al., ICLR 2016) on K samples per datapoint:

        loss_b = -(logsumexp_k [log p(x_b | z_kb) + log N(z_kb; 0, I) - log N(z_kb; mu_b, exp(logvar_b))] - log K)

    K = 1 is the single-sample ELBO on z; as K grows the bound tightens towards log p(x). The
    likelihood kernel reads x for all K samples in place (never a K-fold copy) and computes
    log p and its gradient in one pass over [K, B, D]; the gradient comes out in the
    normalized weights w~_kb = softmax_k(log w_kb) in backward.

    Args:
        logits: [K, B, ...] the decoder's output on z: the logits of a (continuous) Bernoulli, or
            the mean of a Gaussian.
        x: [B, ...] the data, in [0, 1] for the Bernoulli likelihood (outside: a ValueError on
            CPU tensors, see fastvae.set_validate_args, and NaN elsewhere).
        z: [K, B, L] the samples from q(z|x), e.g. fastvae.reparameterize(mu, logvar, samples=K).
        mu, logvar: [B, L] q(z|x)'s mean and log-variance.
        likelihood: the decoder's likelihood: "bernoulli", "continuous_bernoulli" or "gaussian".
        estimator: "iwae" (the default): the gradients are exactly those of the bound w.r.t.
            logits, z, mu and logvar. "dreg": the doubly-reparameterized gradients of Tucker et
            al. (ICLR 2019): every path into z (the prior and posterior terms, and the decoder's
            through the logits) carries the squared normalized weights w~^2 instead of w~, and
            mu and logvar get no direct gradient (log q's score function is stopped: the
            encoder's gradient reaches them through z), while the decoder's parameters keep the
            IWAE gradient. For that, iwae_loss multiplies z's whole gradient by w~ with a hook on
            z: pass the z the decoder ran on, and use it in no other loss. DReG defines first-order
            gradients only: double backward and torch.func transforms are refused (use "iwae"
            for those). The value is the same for both estimators. fastvae.ops.iwae.op's
            docstring has the derivation.
        reduction: "none" (per datapoint, [B]), "sum", "mean" or "batchmean" (both: the mean over
            datapoints, the default).
        decoder_logvar: the Gaussian's log-variance: None (unit variance), [K, B, ...] (a decoder
            output per sample), [B, ...], or anything that broadcasts to logits (a learned
            per-pixel or scalar parameter, read once, its gradient summed in float32).

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or [B].

    Example:
        >>> mu, logvar = encoder(x).chunk(2, dim=1)                   # [B, 32] each
        >>> z = fastvae.reparameterize(mu, logvar, samples=5)         # [5, B, 32]
        >>> loss = fastvae.iwae_loss(decoder(z), x, z, mu, logvar)    # decoder(z): [5, B, 784]
        >>> loss.backward()
    """
    check.check_likelihood(likelihood, decoder_logvar)
    check.check_choice("estimator", estimator, ESTIMATORS)
    if estimator == "dreg" and not torch.compiler.is_compiling() and transform_active():
        raise RuntimeError(_DREG_FIRST_ORDER_ONLY)
    if estimator == "dreg" and torch.compiler.is_compiling() and _torch_version() < DREG_COMPILE_MIN_TORCH:
        raise RuntimeError(_DREG_COMPILE_NEEDS_NEWER_TORCH)
    check.check_reduction(reduction)
    _check_iwae_inputs(logits, x, z, mu, logvar)
    if decoder_logvar is not None:
        check.check_broadcastable("decoder_logvar", decoder_logvar, "logits", logits)
    rows, weights, _, _ = iwae_loss_fused(
        logits, x, z, mu, logvar, decoder_logvar, likelihood, estimator, _needs_grad(logits, decoder_logvar)
    )
    if estimator == "dreg" and z.requires_grad and torch.is_grad_enabled():
        _weight_z_gradient(z, weights)
    _check_target_range(likelihood, "x", rows, x)
    if reduction == "none":
        return rows
    # "mean" is the mean over datapoints, as for the other per-datapoint loss, elbo_loss.
    return _reduce_rows(rows, "sum" if reduction == "sum" else "batchmean", rows.shape[0])
