"""Host time of fastvae's Triton launchers on a machine without a GPU (benchmarks/recording_driver.py).

    python -m benchmarks.triton_launch_cost [--calls 3000] [--batch-size 8]

On a GPU a small VAE's training step is bound by the host: the device finishes each kernel
before the next is issued (docs/benchmarks.md, "GPU"). This times, in microseconds per call and
on this machine's CPU, each launcher a training step runs, as it runs on CUDA: fastvae's
Python (dtypes, output allocation, the tile, the grid) and Triton's dispatch beneath it
(`JITFunction.run`: binding, specialization, cache lookup, launch metadata), with the driver's
own launch left unmade. The `dispatch` column is Triton's share, timed by calling
JITFunction.run with the arguments the launcher passed. The host's work does not depend on the
batch, but a CPU allocation does: outputs are CPU tensors, and from about 128 KB each one is a
fresh mapping with page faults (the CUDA caching allocator hands out cached blocks), so the
default batch keeps them small. Best of 7 repeats; nothing is asserted. Run it where
TRITON_INTERPRET is unset.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from benchmarks.gpu.launch_overhead import captured_launch
from benchmarks.recording_driver import recording_driver

REPEATS = 7


def best_us(fn: Callable[[], object], calls: int) -> float:
    """Microseconds per call, the best of REPEATS timed loops (noise only ever adds time)."""
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def launchers(batch: int, data: int, latent: int) -> dict[str, Callable[[], object]]:
    """The Triton launchers of a training step (fastvae-train's MLP VAE), on its shapes."""
    from fastvae.ops.bernoulli import triton as bernoulli
    from fastvae.ops.gaussian import triton as gaussian
    from fastvae.ops.noise import draw_seed

    mu, logvar = torch.randn(batch, latent), torch.randn(batch, latent)
    logits, x = torch.randn(batch, data), (torch.rand(batch, data) < 0.5).float()
    grad_z, grad_kl = torch.randn(batch, latent), torch.randn(batch)
    seed = draw_seed(torch.device("cpu"))
    return {
        "reparameterize_kl forward": lambda: gaussian.reparameterize_kl_forward(mu, logvar, None, seed),
        "reparameterize_kl backward": lambda: gaussian.reparameterize_kl_backward(
            grad_z, grad_kl, mu, logvar, None, seed
        ),
        "gaussian_kl forward": lambda: gaussian.gaussian_kl_forward(mu, logvar, False, True),
        "bernoulli forward": lambda: bernoulli.bernoulli_forward(logits, x, False, True, -1.0 / batch),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    import triton

    with recording_driver():
        print(f"host us per call, Triton {triton.__version__} dispatch for sm_90, no launch made;")
        print(f"batch {args.batch_size} x 784, latent 32, CPU tensors")
        print(f"{'launcher':<28} {'total':>7} {'dispatch':>9} {'fastvae':>8}")
        for name, launch in launchers(args.batch_size, 784, 32).items():
            launch()  # compiles for sm_90 (seconds, once)
            total = best_us(launch, args.calls)
            dispatch = best_us(captured_launch(launch), args.calls)
            print(f"{name:<28} {total:7.1f} {dispatch:9.1f} {total - dispatch:8.1f}")


if __name__ == "__main__":
    main()
