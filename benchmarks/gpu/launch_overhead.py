"""The host's time per fastvae op call at a training batch, split into fastvae's Python and the
kernel launch beneath it: where a launch-bound step's time goes.

    python -m benchmarks.gpu.launch_overhead [--calls 2000] [--batch-size 128]

On a GPU a training step of a small VAE is bound by the host: the device finishes each kernel
before the host has issued the next (benchmarks/gpu/profile_step.py shows it). This prints, per
call and in microseconds of host time:
  op          the public function, forward only and forward + backward (its backward's kernels)
  launch      Triton's own launch of the op's kernel with the same arguments (JITFunction.run:
              binding, specialization, cache lookup, the driver call), on CUDA only
  torch       plain PyTorch's calls for the same work, for scale
and a cProfile of the forward calls, the functions with the most time of their own. On CUDA it
then times one compiled call each way a compiled graph can reach the Bernoulli kernel: through
fastvae's custom op (a call back into Python), through a `torch.library.triton_op` that
inductor launches itself, and as the op's composite in torch ops that inductor fuses (as compiled
CPU graphs get small calls), at a training batch and a large one: the measurement the choice
between them needs (docs/design.md). A first line says how fast this host runs Python.
Nothing is asserted; the output is for reading.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastvae

PROFILE_ROWS = 25
LARGE_BATCH = 65536  # where the GPU targets' ops are device-bound, if anywhere


def host_us(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Microseconds per call of issuing fn (the device drains once, at the end)."""
    for _ in range(20):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    return issued / calls * 1e6


def captured_launch(fn: Callable[[], object]) -> Callable[[], object] | None:
    """A function repeating the last Triton kernel launch that fn makes, through Triton's own
    JITFunction.run with the same arguments; None if fn launches none (no CUDA, or another
    backend)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    seen: list[tuple] = []
    original = JITFunction.run

    def recording(self, *args, **kwargs):
        seen.append((self, args, kwargs))
        return original(self, *args, **kwargs)

    JITFunction.run = recording
    try:
        fn()
    finally:
        JITFunction.run = original
    if not seen:
        return None
    kernel, args, kwargs = seen[-1]
    return lambda: original(kernel, *args, **kwargs)


def cases(batch: int, data: int, latent: int, device: torch.device) -> dict[str, tuple[Callable, Callable]]:
    """name -> (fastvae's call, plain PyTorch's call for the same result)."""
    generator = torch.Generator(device).manual_seed(0)
    logits = torch.randn(batch, data, device=device, requires_grad=True)
    x = (torch.rand(batch, data, device=device) < 0.5).float()
    mu = torch.randn(batch, latent, device=device, requires_grad=True)
    logvar = torch.randn(batch, latent, device=device, requires_grad=True)

    def fused_sample():
        return fastvae.reparameterize_kl(mu, logvar, generator=generator)

    def plain_sample():
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return z, 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)

    def fused_loss():
        return fastvae.elbo_loss(logits, x, mu, logvar)

    def plain_loss():
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        return (recon + 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum()) / batch

    def fused_likelihood():
        return fastvae.bernoulli_log_likelihood(logits, x)

    def plain_likelihood():
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / batch

    return {
        "reparameterize_kl": (fused_sample, plain_sample),
        "bernoulli_log_likelihood": (fused_likelihood, plain_likelihood),
        "elbo_loss": (fused_loss, plain_loss),
    }


def with_backward(fn: Callable) -> Callable:
    def step():
        out = fn()
        loss = sum(t.sum() for t in out) if isinstance(out, tuple) else out.sum()
        loss.backward()

    return step


def host_speed() -> str:
    """How fast this host runs Python and torch's dispatch, to compare the host time measured here
    with another machine's: a bare Python call, and a CPU tensor op (one dispatch, no device)."""

    def nothing() -> None:
        return None

    small = torch.ones(4)
    python_ns = host_us(nothing, 200_000, torch.device("cpu")) * 1e3
    torch_us = host_us(lambda: small.add(small), 20_000, torch.device("cpu"))
    return f"this host: a Python call {python_ns:.0f} ns, a CPU torch add of 4 elements {torch_us:.2f} us"


def compiled_ways(data: int, calls: int, batches: tuple[int, ...], device: torch.device) -> None:
    """A compiled sum of the Bernoulli rows' log p, three ways a compiled graph can hold the kernel
    (CUDA only): fastvae's custom op (a call back into Python per op), a `torch.library.triton_op`
    of the same Triton kernel (inductor launches it itself), and the op's composite in torch ops
    (inductor fuses it into kernels of its own, as compiled CPU graphs do for small calls). Per
    call: the host's time to issue it, and the wall time with the device drained after each call,
    at a training batch and at a large one."""
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    from fastvae.ops.bernoulli.op import bernoulli_log_likelihood_composite
    from fastvae.ops.bernoulli.triton import _bernoulli_fwd_kernel
    from fastvae.ops.triton_helpers import LAUNCH_OPTIONS, tile

    @triton_op("fastvae_bench::bernoulli_rows", mutates_args=())
    def bernoulli_rows(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows, width = logits.shape
        logp = torch.empty(rows, device=logits.device, dtype=torch.float32)
        block_b, block_d = tile(width)
        wrap_triton(_bernoulli_fwd_kernel)[(triton.cdiv(rows, block_b),)](
            logits, target, logp, logp, rows, width, rows, width, width, 1.0,
            ELEMENTWISE=False, COMPUTE_GRAD=False, COMPUTE=tl.float32, BLOCK_B=block_b, BLOCK_D=block_d,
            num_warps=LAUNCH_OPTIONS["num_warps"],
        )  # fmt: skip
        return logp

    ways = {
        "custom op": lambda l, t: torch.ops.fastvae.bernoulli_log_likelihood(l, t, False, False, None)[0].sum(),
        "triton_op": lambda l, t: bernoulli_rows(l, t).sum(),
        "composite": lambda l, t: bernoulli_log_likelihood_composite(l, t, False, False, None)[0].sum(),
    }

    def drained(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> None:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return call

    print(f"\ncompiled (default mode), the Bernoulli rows' sum at batch x {data}, us per call:")
    print(f"  {'way':<10} {'batch':>6} {'host':>8} {'wall':>8}")
    for batch in batches:
        logits = torch.randn(batch, data, device=device)
        x = (torch.rand(batch, data, device=device) < 0.5).float()
        results = {}
        for name, fn in ways.items():
            try:
                compiled = torch.compile(fn, fullgraph=True, dynamic=False)
                results[name] = compiled(logits, x)
                call = functools.partial(compiled, logits, x)
                issue = host_us(call, calls, device)
                wall = host_us(drained(call), max(calls // 10, 20), device)
                print(f"  {name:<10} {batch:6d} {issue:8.1f} {wall:8.1f}")
            except Exception as error:  # a diagnostic: report what failed and go on
                print(f"  {name:<10} {batch:6d} failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        if "custom op" in results:
            same = {n: torch.allclose(r, results["custom op"], rtol=1e-4) for n, r in results.items()}
            print(f"  same value as the custom op: {same}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = fastvae.backend.resolve_backend_name(device)
    print(host_speed())
    print(f"host time per call, microseconds; {device} ({backend} backend), batch {args.batch_size}, 784 x 32")
    print(f"{'op':<26} {'fwd':>8} {'fwd+bwd':>8} {'launch':>8} {'torch fwd':>10} {'torch f+b':>10}")
    for name, (fused, plain) in cases(args.batch_size, 784, 32, device).items():
        with torch.no_grad():
            forward = host_us(fused, args.calls, device)
            plain_forward = host_us(plain, args.calls, device)
            launch = captured_launch(fused)
            launch_us = host_us(launch, args.calls, device) if launch is not None else None
        both = host_us(with_backward(fused), args.calls // 4, device)
        plain_both = host_us(with_backward(plain), args.calls // 4, device)
        shown = "-" if launch_us is None else f"{launch_us:8.1f}"
        print(f"{name:<26} {forward:8.1f} {both:8.1f} {shown:>8} {plain_forward:10.1f} {plain_both:10.1f}")
    print("\n(launch: '-' where no Triton kernel runs, as on the CPU)")

    fused = cases(args.batch_size, 784, 32, device)["elbo_loss"][0]
    step = with_backward(fused)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls // 4):
        step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(PROFILE_ROWS)
    print(f"\ncProfile of {args.calls // 4} elbo_loss forward + backward calls, by own time:")
    print(out.getvalue())
    if device.type == "cuda":
        compiled_ways(784, args.calls, (args.batch_size, LARGE_BATCH), device)
    else:
        print("(compiled ways: CUDA only, inductor cannot compile the interpreter's kernels)")


if __name__ == "__main__":
    main()
