"""Interleaved A/B of a whole training step: plain PyTorch loop against fastvae, in one process.

    python -m benchmarks.train_ab [--blocks 150] [--steps 5] [--compile] [--no-optimizer] [--device cpu|cuda]

bench_train.py times each provider in its own pytest case, minutes apart; on a shared
machine the load drifts between cases by more than the difference being measured (a
2-core VM moved single cases by +-20%). Here the two steps (benchmarks.bench_train.
make_step, the exact closures bench_train times) alternate in blocks of a few steps, the
order flipping every block, and each block pair gives one ratio plain_time /
fastvae_time: drift hits both sides of a pair alike. The median ratio and its quartiles
are printed for fp32 and AMP. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_train import BATCH_SIZE, make_step
from benchmarks.harness import pin_cpu_allocator

PROVIDERS = ("plain", "fastvae")
WARMUP_STEPS = 20


def paired_ratios(steps: dict, blocks: int, steps_per_block: int, device: torch.device) -> tuple[list, dict]:
    """Per block pair: plain seconds / fastvae seconds; and each provider's seconds per step."""
    ratios, seconds = [], {name: [] for name in steps}
    for block in range(blocks):
        per_step = {}
        for name in PROVIDERS if block % 2 else PROVIDERS[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(steps_per_block):
                steps[name]()
            per_step[name] = (time.perf_counter() - start) / steps_per_block
            seconds[name].append(per_step[name])
        ratios.append(per_step["plain"] / per_step["fastvae"])
    return ratios, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=150, help="block pairs (default 150)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per block (default 5)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both steps' forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="time forward and backward only, without the Adam step that dilutes the loss side")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # As in the pytest suite: with glibc's adaptive thresholds the AMP ratio's quartiles
    # spanned 0.80 to 1.23 on a 2-core CPU; fixed, 0.98 to 1.05.
    allocator = pin_cpu_allocator()
    print(f"training step{' without the optimizer' if args.no_optimizer else ''}, batch {BATCH_SIZE}, {device}, "
          f"{torch.get_num_threads()} threads, "
          f"{'torch.compile' if args.compile else 'eager'}, {args.blocks} block pairs of {args.steps} steps, "
          f"{allocator}")
    for amp in (False, True):
        steps = {name: make_step(name, args.compile, amp, device, quick=False, optimize=not args.no_optimizer)
                 for name in PROVIDERS}
        for step in steps.values():
            for _ in range(WARMUP_STEPS):
                step()
        ratios, seconds = paired_ratios(steps, args.blocks, args.steps, device)
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"  {'AMP ' if amp else 'fp32'}: plain {statistics.median(seconds['plain']) * 1e3:.2f} ms, "
              f"fastvae {statistics.median(seconds['fastvae']) * 1e3:.2f} ms per step; "
              f"fastvae speed / plain: median {statistics.median(ratios):.3f}x (quartiles {low:.3f} to {high:.3f})")


if __name__ == "__main__":
    main()
