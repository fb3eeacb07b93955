"""Test-set evaluation in nats: the -ELBO and the importance-sampled NLL.

Importance-weighted estimate of log p(x) with K samples z_k ~ q(z|x) (Burda et al. 2016):
    log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K
The K samples go through the decoder in chunks of at most `iw_batch_size`
(datapoint, sample) pairs, so memory stays bounded for any K. Each chunk of k
samples is one fused fastvae.iwae_loss, the bound on k samples; the chunks'
bounds are combined in float64, because the log-weights of ~784 pixels are
hundreds of nats and their differences matter at the 0.01 level.

A model here has encode(x) -> mu, logvar, decode(z) -> the decoder output, and
likelihood and decoder_logvar as fastvae's losses take them (models.VAE).
"""

from __future__ import annotations

import math

import torch
from rich.table import Table
from torch import Tensor

import fastvae
from fastvae.train.data import derive_seed, eval_batches
from fastvae.train.distributed import DistInfo, all_reduce_sum

# What the NLL of a likelihood is, where it is not the probability of binary images (the
# results' "nll_note"): the README quotes these, keep them short and exact.
DENSITY_NOTE = (
    "a density: -log p of the pixel values scaled to [0, 1], in nats per image; not a probability "
    "of the 8-bit or binarized images, so not comparable with the NLLs of discrete likelihoods"
)
GREY_BERNOULLI_NOTE = (
    "the Bernoulli of grey levels in [0, 1] (--binarize none) is not a normalized likelihood; "
    "not comparable with the NLLs of binarized images"
)


def make_generator(device: torch.device, *keys: int | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


@torch.no_grad()
def elbo_rows(model, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One-sample ELBO terms of x [B, C, H, W]: recon = -log p(x|z) [B] and KL [B], float32."""
    mu, logvar = model.encode(x)
    z = fastvae.reparameterize(mu, logvar, generator=generator)
    recon, kl = fastvae.elbo_terms(
        model.decode(z), x, mu, logvar, likelihood=model.likelihood, decoder_logvar=model.decoder_log_variance()
    )
    return recon.float(), kl.float()


@torch.no_grad()
def iw_log_likelihood(model, x: Tensor, samples: int, iw_batch_size: int, generator: torch.Generator) -> Tensor:
    """Importance-sampled log p(x) [B] float64 for x [B, C, H, W] with `samples` draws each.

    A chunk of k samples gives the bound L_k = logsumexp_k log w - log k per datapoint (fastvae.iwae_loss),
    so logsumexp over the chunks of (L_k + log k), minus log K, is the estimate on all K samples."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if iw_batch_size < 1:
        raise ValueError(f"iw_batch_size must be >= 1, got {iw_batch_size}")
    mu, logvar = model.encode(x)
    batch = mu.shape[0]
    per_chunk = max(1, iw_batch_size // batch)
    total = torch.full((batch,), -math.inf, dtype=torch.float64, device=x.device)
    done = 0
    while done < samples:
        k = min(per_chunk, samples - done)
        z = fastvae.reparameterize(mu, logvar, samples=k, generator=generator)  # [k, B, L]
        decoded = model.decode(z)  # [k, B, C, H, W]
        bound = -fastvae.iwae_loss(
            decoded,
            x,
            z,
            mu,
            logvar,
            likelihood=model.likelihood,
            decoder_logvar=model.decoder_log_variance(),
            reduction="none",
        )
        total = torch.logaddexp(total, bound.double() + math.log(k))
        done += k
    return total - math.log(samples)


def likelihood_fields(likelihood: str, binarize: str) -> dict[str, str]:
    """The results' "likelihood" (fastvae's name) and, where the -ELBO and NLL are not probabilities of
    binarized images, an "nll_note" saying what they are."""
    fields = {"likelihood": likelihood}
    if likelihood != "bernoulli":
        fields["nll_note"] = DENSITY_NOTE
    elif binarize == "none":
        fields["nll_note"] = GREY_BERNOULLI_NOTE
    return fields


def _reduce(sums: list[float], device: torch.device, dist_info) -> list[float]:
    values = torch.tensor(sums, dtype=torch.float64, device=device)
    return all_reduce_sum(values, dist_info).tolist()


def evaluate_elbo(model, split, batch_size: int, device: torch.device, seed: int, dist_info=None) -> dict[str, float]:
    """Mean -ELBO, reconstruction term and KL in nats per datapoint over `split` (prepared targets)."""
    dist_info = dist_info or DistInfo()
    generator = torch.Generator().manual_seed(seed)
    sums = [0.0, 0.0, 0.0]  # recon, kl, count
    was_training = model.training
    model.eval()
    for images, _ in eval_batches(split, batch_size, dist_info.rank, dist_info.world_size):
        recon, kl = elbo_rows(model, images.to(device), generator)
        sums = [sums[0] + recon.sum().item(), sums[1] + kl.sum().item(), sums[2] + len(images)]
    model.train(was_training)
    recon_sum, kl_sum, count = _reduce(sums, device, dist_info)
    count = max(count, 1.0)
    return {"neg_elbo": (recon_sum + kl_sum) / count, "recon": recon_sum / count, "kl": kl_sum / count}


def evaluate_nll(
    model,
    split,
    samples: int,
    iw_batch_size: int,
    batch_size: int,
    device: torch.device,
    seed: int,
    dist_info=None,
    progress=None,
) -> dict[str, float]:
    """Importance-sampled NLL in nats per datapoint and its standard error over datapoints."""
    dist_info = dist_info or DistInfo()
    generator = make_generator(device, "iw", seed)
    sums = [0.0, 0.0, 0.0]  # nll, nll^2, count
    was_training = model.training
    model.eval()
    for images, _ in eval_batches(split, batch_size, dist_info.rank, dist_info.world_size):
        nll = -iw_log_likelihood(model, images.to(device), samples, iw_batch_size, generator)
        sums = [sums[0] + nll.sum().item(), sums[1] + nll.square().sum().item(), sums[2] + len(images)]
        if progress is not None:
            progress(len(images))
    model.train(was_training)
    total, total_sq, count = _reduce(sums, device, dist_info)
    mean = total / max(count, 1.0)
    variance = max(total_sq / count - mean * mean, 0.0) * count / (count - 1) if count > 1 else 0.0
    return {
        "nll": mean,
        "nll_stderr": math.sqrt(variance / max(count, 1.0)),
        "iw_samples": samples,
        "examples": int(count),
    }


def evaluate_test(
    model,
    split,
    *,
    iw_samples: int,
    iw_examples: int,
    iw_batch_size: int,
    batch_size: int,
    device: torch.device,
    seed: int,
    dist_info=None,
    progress=None,
) -> dict[str, float]:
    """Test -ELBO (+ its terms) over the whole split and IW NLL over its first `iw_examples`
    images (0: all) with `iw_samples` samples each (0: no NLL), in nats per datapoint, in float32 math."""
    for name, value in (("iw_samples", iw_samples), ("iw_examples", iw_examples)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    elbo = evaluate_elbo(model, split, batch_size, device, seed, dist_info)
    result = {f"test_{key}": value for key, value in elbo.items()}
    result["test_examples"] = len(split)
    if iw_samples > 0:
        if 0 < iw_examples < len(split):
            split = type(split)(split.images[:iw_examples], split.labels[:iw_examples])
        nll = evaluate_nll(
            model, split, iw_samples, iw_batch_size, min(batch_size, iw_batch_size), device, seed, dist_info, progress
        )
        result.update(
            {
                "test_nll": nll["nll"],
                "test_nll_stderr": nll["nll_stderr"],
                "iw_samples": nll["iw_samples"],
                "iw_examples": nll["examples"],
            }
        )
    return result


def results_table(result: dict[str, float], title: str):
    """A rich table of evaluation results (nats per datapoint), their nll_note beneath."""
    table = Table(title=title, caption=result.get("nll_note"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key == "nll_note":
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    return table
