"""Where a training step's time goes on a GPU, fastvae against plain PyTorch: torch.profiler tables.

    python -m benchmarks.gpu.profile_step [--modes eager default] [--steps 10] [--batch-size 128]

train_ab gives the whole step's ratio; this says why. For each compile mode and provider it runs
the step of benchmarks.bench_train (fastvae-train's model and objective, fp32) a few times to warm
up, then profiles --steps steps and prints, per step: the wall time, the host's time in each of
the busiest operators (self CPU time), the kernels launched and the device's busy time. A step
that the host cannot issue as fast as the device runs it is launch-bound: then the host-side rows
are what to cut. Nothing is asserted; the output is for reading.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_train import BATCH_SIZE, PROVIDERS, make_step

ROWS = 18  # the busiest operators shown per table


def _launches(events) -> int:
    """Kernel launches among the profiled host events (the runtime's launch calls)."""
    return sum(e.count for e in events if "LaunchKernel" in e.key or e.key == "cuLaunchKernelEx")


def profile(provider: str, mode: str, steps: int, batch_size: int, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = make_step(provider, mode, amp=False, device=device, batch_size=batch_size)
    for _ in range(5):  # compile, autotune, allocator growth
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - start) / steps
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) / steps if device.type == "cuda" else 0.0
    print(f"\n=== {provider}, compile {mode}, batch {batch_size}: {wall * 1e3:.3f} ms per step unprofiled")
    print(f"    per step: {_launches(events) / steps:.1f} kernel launches, device busy {device_us:.0f} us")
    print(events.table(sort_by="self_cpu_time_total", row_limit=ROWS, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["eager", "default"], choices=["eager", "default"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for mode in args.modes:
        for provider in PROVIDERS:
            profile(provider, mode, args.steps, args.batch_size, device)


if __name__ == "__main__":
    main()
