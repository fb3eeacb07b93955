"""Where the sampler's time goes inside an eager training step: fastvae's routes against plain
PyTorch's sampling, each call timed in place, and what each does to the whole step.

    python -m benchmarks.sampler_in_step [--blocks 150] [--steps 5] [--batch 128]

Inside a step every call runs right after matrix products that have swept the caches, so Python
there costs several times its warm price (docs/design.md, "The eager path"). Each variant below is
the training step of fastvae-train's model (eager, fp32, CPU, native backend) with its sampler call
swapped; the call alone is timed in every step, the steps of all variants run interleaved in
blocks (the order rotating), and the median per variant is printed beside the same call's warm time
(the call repeated on its own), and each variant's whole step: its median, and the median over
block rounds of the Python route's step time over its own (above 1: faster than the Python route;
plain's and hollow's steps also differ after the call, their loss computing the KL):

  plain      mu + exp(0.5 * logvar) * randn_like(mu): the loop a user writes
  public     fastvae.reparameterize_kl(mu, logvar) as shipped: its C++ route
             (fastvae/ops/gaussian/eager.cpp, autograd in C++) where that is built, which the
             header says
  python     the op's Python route, FusedOp's autograd.Function, called directly: what public
             runs where the C++ route is not built
  floor      a minimal Python autograd.Function with the same native binding: a seed from
             torch.randint, the binding's call, save for backward
  bare       the floor with the binding inlined: two allocations, the seed's value, one ctypes call
  hollow     the bare Function without the seed and the kernel call: an autograd.Function that
             allocates z and kl and saves its inputs, what any Python route pays

A hollow call returns uninitialized tensors, so its step decodes mu instead and takes the KL from
elbo_loss. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch

import fastvae
from benchmarks.bench_train import IMAGE_SHAPE
from benchmarks.harness import pin_cpu_allocator
from fastvae.backend import resolve_backend_name
from fastvae.ops import eager_extension, library
from fastvae.ops.gaussian import native
from fastvae.ops.gaussian.op import reparameterize_kl_fused
from fastvae.ops.noise import SEED_HIGH
from fastvae.train.models import VAEConfig, build_model

_FLOAT32 = library.DTYPE_CODES[torch.float32]


def _draw_seed() -> torch.Tensor:
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64)


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar):
        seed = _draw_seed()
        z, kl = native.reparameterize_kl_forward(mu, logvar, None, seed)
        ctx.save_for_backward(mu, logvar, seed)
        ctx.set_materialize_grads(False)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        mu, logvar, seed = ctx.saved_tensors
        return native.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, None, seed)


class _Bare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar):
        seed = _draw_seed()
        rows, cols = mu.shape
        z, kl = torch.empty(rows, cols), torch.empty(rows)
        library.function("fastvae_reparameterize_kl_forward")(
            _FLOAT32, rows, cols, 1, mu.data_ptr(), mu.stride(0), logvar.data_ptr(), logvar.stride(0),
            None, 0, int(seed), z.data_ptr(), kl.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(mu, logvar, seed)
        ctx.set_materialize_grads(False)
        return z, kl

    backward = _Floor.backward


class _Hollow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar):
        rows, cols = mu.shape
        z, kl = torch.empty(rows, cols), torch.empty(rows)
        ctx.save_for_backward(mu, logvar)
        ctx.set_materialize_grads(False)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        raise RuntimeError("a hollow call's outputs are never used")


def _plain(mu, logvar):
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu), None


# name -> (the sampler call (mu, logvar) -> (z, kl or None), whether its outputs are real)
VARIANTS = {
    "plain": (_plain, True),
    "public": (fastvae.reparameterize_kl, True),
    "python": (lambda mu, logvar: reparameterize_kl_fused._function.apply(mu, logvar, None, None, None)[:2], True),
    "floor": (_Floor.apply, True),
    "bare": (_Bare.apply, True),
    "hollow": (_Hollow.apply, False),
}


def make_step(name: str, batch_size: int, seconds: list):
    """One eager training step of fastvae-train's model with `name`'s sampler; appends the sampler
    call's seconds to `seconds`."""
    sampler, real = VARIANTS[name]
    torch.manual_seed(0)
    model = build_model(VAEConfig(image_shape=IMAGE_SHAPE))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = (torch.rand(batch_size, *IMAGE_SHAPE) < 0.5).float()

    def step() -> None:
        mu, logvar = model.encode(x)
        start = time.perf_counter()
        z, kl = sampler(mu, logvar)
        seconds.append(time.perf_counter() - start)
        if not real:
            z, kl = mu, None
        decoded = model.decode(z)
        # plain's and a hollow call's steps take the KL from elbo_loss
        loss = fastvae.elbo_loss(decoded, x, mu, logvar) if kl is None else fastvae.elbo_loss(decoded, x, kl=kl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def warm_seconds(name: str, batch_size: int, repeats: int = 2000) -> float:
    """The sampler call's seconds repeated on its own (warm caches), on the step's shapes."""
    sampler, _ = VARIANTS[name]
    mu, logvar = (torch.randn(batch_size, 32, requires_grad=True) for _ in range(2))
    return min(timeit.repeat(lambda: sampler(mu, logvar), number=repeats, repeat=5)) / repeats


def measure(names: list[str], batch_size: int, blocks: int, steps_per_block: int, warm_repeats: int = 2000) -> dict:
    """name -> {"in_step": median seconds of the sampler call in the step, "warm": the call's warm
    seconds, "step": median seconds per whole step, "step_vs_python": the median over block rounds
    of the Python route's step seconds / this variant's (above 1: this variant's step is faster)}."""
    calls = {name: [] for name in names}
    steps = {name: make_step(name, batch_size, calls[name]) for name in names}
    for name, step in steps.items():
        for _ in range(10):
            step()
        calls[name].clear()
    block_seconds = {name: [] for name in names}
    for block in range(blocks):
        shift = block % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(steps_per_block):
                steps[name]()
            block_seconds[name].append((time.perf_counter() - start) / steps_per_block)
    return {
        name: {
            "in_step": statistics.median(calls[name]),
            "warm": warm_seconds(name, batch_size, warm_repeats),
            "step": statistics.median(block_seconds[name]),
            "step_vs_python": statistics.median(p / v for p, v in zip(block_seconds["python"], block_seconds[name])),
        }
        for name in names
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=150, help="blocks of every variant (default 150)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per block (default 5)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128, fastvae-train's)")
    parser.add_argument("--warm-repeats", type=int, default=2000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if resolve_backend_name(torch.device("cpu")) != "native":
        parser.error("the fused variants call the native library: build it, and leave FASTVAE_BACKEND unset")
    allocator = pin_cpu_allocator()
    results = measure(list(VARIANTS), args.batch, args.blocks, args.steps, args.warm_repeats)
    print(
        f"sampler call inside an eager fp32 training step, batch {args.batch} x 32, cpu "
        f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, {allocator}; "
        f"{args.blocks} blocks of {args.steps} steps; public runs {public_route()}"
    )
    print(f"  {'variant':10s} {'in step':>9s} {'warm':>9s} {'step':>9s} {'step vs python':>15s}")
    for name, r in results.items():
        print(
            f"  {name:10s} {r['in_step'] * 1e6:7.0f}us {r['warm'] * 1e6:7.1f}us {r['step'] * 1e3:7.2f}ms "
            f"{r['step_vs_python']:14.3f}x"
        )


def public_route() -> str:
    """Which route fastvae.reparameterize_kl takes here: its C++ route, or the Python one and why."""
    mu, logvar = (torch.randn(2, 3, requires_grad=True) for _ in range(2))
    if "CppNode" in fastvae.reparameterize_kl(mu, logvar)[0].grad_fn.name():
        return "the C++ route"
    why = eager_extension._failure
    return f"the Python route (the C++ route is not built: {why})"


if __name__ == "__main__":
    main()
