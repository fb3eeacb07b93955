"""Interleaved A/B of the importance-sampled test NLL: fastvae-eval's fused estimator against the unfused one.

    ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.eval_ab [--samples 1000] [--images 100] [--repeats 7]
                                                          [--iw-batch-size 16384] [--checkpoint PT] [--json OUT]

setup: fastvae-train's default model (MLP VAE, 784-512-256-32, Bernoulli decoder), random weights
(seed 0) or a --checkpoint of that shape, on the first --images Fashion-MNIST test images binarized
with a fixed seed (seeded random bits where no copy of the data is found); K = --samples importance
samples per image, in chunks of --iw-batch-size (image, sample) pairs, as fastvae-eval runs it.
estimators:
  unfused  unfused_iw_log_likelihood below: the estimator fastvae-eval used before the fused bound,
           kept here as the competitor: noise from torch.randn, z through fastvae.reparameterize on
           K-fold copies of mu and logvar, and log q, log p(z) and the Bernoulli log-likelihood as
           separate passes over [k * B, ...] tensors.
  fused    fastvae.train.evaluate.iw_log_likelihood: fastvae.reparameterize(samples=k) reads mu and
           logvar in place, and one fastvae.iwae_loss per chunk gives the bound.
The two alternate, the order flipping every repeat, and each pair gives one ratio unfused_time /
fused_time, so that load drifting on a shared machine hits both sides of a pair alike. The median
ratio and its quartiles are printed with both estimates (different noise: they agree within their
standard errors). Nothing is asserted; tests/test_evaluate.py checks both estimators' values.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
from torch import Tensor

import fastvae
from benchmarks.harness import device_name, pin_cpu_allocator, synchronize
from fastvae.train.checkpoint import load_checkpoint, model_from_checkpoint
from fastvae.train.data import DataError, binarize, load_test_split
from fastvae.train.evaluate import iw_log_likelihood
from fastvae.train.models import VAE, VAEConfig, build_model

IMAGE_SHAPE = (1, 28, 28)  # Fashion-MNIST
LOG_2PI = math.log(2.0 * math.pi)


@torch.no_grad()
def unfused_iw_log_likelihood(model, x: Tensor, samples: int, iw_batch_size: int, generator: torch.Generator) -> Tensor:
    """Importance-sampled log p(x) [B] float64 of a Bernoulli decoder, as fastvae-eval computed it before the
    fused bound: every chunk of k samples copies mu and logvar k times, draws eps with torch.randn, and
    sums log p(x|z), log p(z) and log q(z|x) in separate passes, the log-weights then in float64."""
    mu, logvar = model.encode(x)
    batch, latent = mu.shape
    per_chunk = max(1, iw_batch_size // batch)
    total = torch.full((batch,), -math.inf, dtype=torch.float64, device=x.device)
    done = 0
    while done < samples:
        k = min(per_chunk, samples - done)
        mu_k = mu.expand(k, batch, latent).reshape(k * batch, latent)
        logvar_k = logvar.expand(k, batch, latent).reshape(k * batch, latent)
        eps = torch.randn(mu_k.shape, generator=generator, device=x.device, dtype=mu.dtype)
        z = fastvae.reparameterize(mu_k, logvar_k, eps)
        log_q = (-0.5 * (eps.square() + logvar_k + LOG_2PI)).sum(1)
        log_prior = (-0.5 * (z.square() + LOG_2PI)).sum(1)
        x_k = x.expand(k, *x.shape).reshape(k * batch, *x.shape[1:])
        log_lik = fastvae.bernoulli_log_likelihood(model.decode(z), x_k, reduction="none").flatten(1).sum(1)
        log_w = (log_lik + log_prior - log_q).double().reshape(k, batch)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        done += k
    return total - math.log(samples)


ESTIMATORS = {"unfused": unfused_iw_log_likelihood, "fused": iw_log_likelihood}


def benchmark_model(checkpoint: str | None, device: torch.device) -> tuple[VAE, str]:
    """The default fastvae-train model, random (seed 0) or from a checkpoint; and what it is."""
    if checkpoint:
        state = load_checkpoint(checkpoint)
        model = model_from_checkpoint(state, checkpoint)
        if model.config.image_shape != IMAGE_SHAPE or model.likelihood != "bernoulli":
            raise SystemExit(
                f"{checkpoint} is not a Bernoulli model of {IMAGE_SHAPE} images, which the unfused competitor needs"
            )
        what = f"{checkpoint} (step {state['step']})"
    else:
        torch.manual_seed(0)
        model = build_model(VAEConfig(image_shape=IMAGE_SHAPE))
        what = "random weights (seed 0)"
    return model.to(device).eval(), what


def benchmark_images(count: int, device: torch.device) -> tuple[Tensor, str]:
    """The first `count` Fashion-MNIST test images, binarized with seed 0; seeded random bits without the data."""
    generator = torch.Generator().manual_seed(0)
    try:
        test, folder = load_test_split("fashion-mnist", None, download=False)
        images, source = binarize(test.images[:count], generator), f"Fashion-MNIST test images from {folder}"
    except DataError:
        images, source = (torch.rand(count, *IMAGE_SHAPE, generator=generator) < 0.5).float(), "random bits"
    return images.to(device), source


def timed(estimator, model, x: Tensor, samples: int, iw_batch_size: int, seed: int) -> tuple[float, float]:
    """(seconds, mean NLL) of one estimate over all of x."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    synchronize(x.device)
    start = time.perf_counter()
    log_p = estimator(model, x, samples, iw_batch_size, generator)
    synchronize(x.device)
    return time.perf_counter() - start, -log_p.mean().item()


def measure(model, x: Tensor, samples: int, iw_batch_size: int, repeats: int) -> dict:
    """Paired, interleaved timings of the two estimators (one warm-up call each first)."""
    for estimator in ESTIMATORS.values():
        timed(estimator, model, x, samples, iw_batch_size, seed=0)
    seconds = {name: [] for name in ESTIMATORS}
    nll = {name: [] for name in ESTIMATORS}
    ratios = []
    for repeat in range(repeats):
        for name in ESTIMATORS if repeat % 2 else reversed(ESTIMATORS):
            took, value = timed(ESTIMATORS[name], model, x, samples, iw_batch_size, seed=repeat + 1)
            seconds[name].append(took)
            nll[name].append(value)
        ratios.append(seconds["unfused"][-1] / seconds["fused"][-1])
    low, median, high = statistics.quantiles(ratios, n=4) if repeats > 1 else (ratios[0],) * 3
    return {
        "unfused_s": statistics.median(seconds["unfused"]),
        "fused_s": statistics.median(seconds["fused"]),
        "ratio_median": statistics.median(ratios),
        "ratio_q1": low,
        "ratio_q3": high,
        "unfused_nll": statistics.mean(nll["unfused"]),
        "fused_nll": statistics.mean(nll["fused"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="importance samples K per image (default 1000)")
    parser.add_argument("--images", type=int, default=100, help="test images in the timed set (default 100)")
    parser.add_argument(
        "--iw-batch-size",
        type=int,
        default=16384,
        help="(image, sample) pairs per decoder call, fastvae-eval's default (default 16384)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed pairs of estimates (default 7)")
    parser.add_argument(
        "--checkpoint", default=None, help="a fastvae-train checkpoint of the default model (default: random weights)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    for flag, value in (
        ("--samples", args.samples),
        ("--images", args.images),
        ("--repeats", args.repeats),
        ("--iw-batch-size", args.iw_batch_size),
    ):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    device = torch.device(args.device)
    allocator = pin_cpu_allocator()
    model, model_source = benchmark_model(args.checkpoint, device)
    x, image_source = benchmark_images(args.images, device)
    machine = f"{platform.node()}: {device_name(device)}, {torch.get_num_threads()} threads"
    print(
        f"importance-sampled NLL, K={args.samples}, {len(x)} images ({image_source}), iw batch "
        f"{args.iw_batch_size}, {model_source}, {device}, {args.repeats} pairs; {machine}; {allocator}"
    )
    result = measure(model, x, args.samples, args.iw_batch_size, args.repeats)
    print(
        f"  unfused {result['unfused_s']:.3f} s, fused {result['fused_s']:.3f} s per estimate; fused speed / "
        f"unfused: median {result['ratio_median']:.3f}x (quartiles {result['ratio_q1']:.3f} to "
        f"{result['ratio_q3']:.3f})"
    )
    print(
        f"  mean NLL over the repeats: unfused {result['unfused_nll']:.3f}, fused {result['fused_nll']:.3f} nats "
        f"(different noise)"
    )
    if args.json:
        row = {
            **result,
            "samples": args.samples,
            "images": len(x),
            "iw_batch_size": args.iw_batch_size,
            "repeats": args.repeats,
            "model": model_source,
            "data": image_source,
            "device": str(device),
            "machine": machine,
            "allocator": allocator,
            "torch": torch.__version__,
        }
        with open(args.json, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
