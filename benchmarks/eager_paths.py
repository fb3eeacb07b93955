"""What fastvae's two eager mechanisms save, measured: the autograd.Function route and the hand-over.

    python -m benchmarks.eager_paths [--batch 128] [--repeats 400] [--device cpu]

fastvae keeps a mechanism only where it pays (at least 10% of the op's own time, or 2% of a
training step). Two exist on the eager path (fastvae.ops.common):

- route: a plain eager call runs the op's forward and backward through a torch.autograd.Function
  (for the sampler on the native backend, its C++ route: benchmarks.sampler_in_step splits the two)
  instead of the registered custom op, which crosses the dispatcher several more times;
- hand-over: a loss that weights the likelihood rows' sum by w hands the gradient the kernel
  wrote in the forward pass straight to autograd, instead of one more multiply over [B, D].

Each is timed on and off, forward + backward, interleaved in one process (the order flipping
each round; the median of the per-round ratios), at the training batch, beside the whole
training step of fastvae-train's model at the same batch, so both shares are printed.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

import fastvae
from benchmarks.bench_train import make_step
from benchmarks.harness import pin_cpu_allocator
from fastvae.ops import common
from fastvae.ops.bernoulli.op import bernoulli_log_likelihood_fused
from fastvae.ops.gaussian.op import reparameterize_kl_fused

MNIST_PIXELS, LATENT = 784, 32


def _cases(batch: int, device: torch.device) -> dict:
    """name -> (fastvae call as users make it, the same through the custom op), forward + backward."""
    logits = torch.randn(batch, MNIST_PIXELS, device=device, requires_grad=True)
    target = (torch.rand(batch, MNIST_PIXELS, device=device) < 0.5).float()
    mu, logvar = (torch.randn(batch, LATENT, device=device, requires_grad=True) for _ in range(2))
    upstream = torch.randn(batch, LATENT, device=device)

    def sample(route):
        z, kl, _ = route(mu, logvar, None, None, None)
        torch.autograd.backward([z, kl], [upstream, torch.ones_like(kl)])

    def likelihood(route):
        rows, _ = route(logits, target, False, True, -batch)
        (-rows.sum() / batch).backward()

    return {
        "reparameterize_kl": (
            lambda: sample(reparameterize_kl_fused),
            lambda: sample(reparameterize_kl_fused.custom_op),
        ),
        "bernoulli (elbo's likelihood)": (
            lambda: likelihood(bernoulli_log_likelihood_fused),
            lambda: likelihood(bernoulli_log_likelihood_fused.custom_op),
        ),
    }


def _handover_case(batch: int, device: torch.device):
    logits = torch.randn(batch, MNIST_PIXELS, device=device, requires_grad=True)
    target = (torch.rand(batch, MNIST_PIXELS, device=device) < 0.5).float()
    kl = torch.rand(batch, device=device)

    def run():
        fastvae.elbo_loss(logits, target, kl=kl).backward()

    return run


def _paired(a, b, repeats: int) -> tuple[float, float, float]:
    """Median seconds of a and of b, and the median of the per-round ratios a / b."""
    for _ in range(20):
        a(), b()
    times_a, times_b, ratios = [], [], []
    for i in range(repeats):
        pair = {}
        for name, fn in (("a", a), ("b", b)) if i % 2 else (("b", b), ("a", a)):
            start = time.perf_counter()
            fn()
            pair[name] = time.perf_counter() - start
        times_a.append(pair["a"])
        times_b.append(pair["b"])
        ratios.append(pair["a"] / pair["b"])
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128, fastvae-train's)")
    parser.add_argument("--repeats", type=int, default=400, help="interleaved rounds per comparison (default 400)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    allocator = pin_cpu_allocator()
    step = make_step("fastvae", "eager", False, device, batch_size=args.batch)
    for _ in range(10):
        step()
    step_seconds = statistics.median(_time(step) for _ in range(50))
    print(
        f"batch {args.batch}, {device}, {torch.get_num_threads()} threads, {allocator}; a whole eager fp32 "
        f"training step (fastvae, MLP 784-512-256-32, Adam): {step_seconds * 1e3:.2f} ms"
    )
    for name, (function_route, custom_op_route) in _cases(args.batch, device).items():
        fast, slow, ratio = _paired(function_route, custom_op_route, args.repeats)
        saved = slow - fast
        print(
            f"  route, {name}: eager route {fast * 1e6:.1f} us, custom op {slow * 1e6:.1f} us per "
            f"forward + backward; saves {saved * 1e6:.1f} us = {100 * saved / slow:.1f}% of the op, "
            f"{100 * saved / step_seconds:.2f}% of the step (median ratio {1 / ratio:.3f}x)"
        )
    run = _handover_case(args.batch, device)

    def without_handover():
        with mock.patch.object(common, "is_the_weight", lambda grad, weight: False):
            run()

    fast, slow, ratio = _paired(run, without_handover, args.repeats)
    saved = slow - fast
    print(
        f"  hand-over, elbo_loss(kl=) at {args.batch} x {MNIST_PIXELS}: {fast * 1e6:.1f} us with, "
        f"{slow * 1e6:.1f} us "
        f"without; saves {saved * 1e6:.1f} us = {100 * saved / slow:.1f}% of the op, "
        f"{100 * saved / step_seconds:.2f}% of the step (median ratio {1 / ratio:.3f}x)"
    )


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
