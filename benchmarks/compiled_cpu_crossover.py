"""Where a compiled CPU graph should call fastvae's kernels, and where it should inline the composite.

    python -m benchmarks.compiled_cpu_crossover [--batch-sizes 128,1024] [--blocks 60] [--json OUT]

Inside torch.compile on the CPU, a fused op is either one opaque custom-op node (a call back into
Python, then ctypes, then a kernel that starts cold between the graph's matrix products) or its
composite, torch ops that inductor fuses into the graph's own C++ loops
(fastvae.ops.common.COMPILED_CPU_COMPOSITE_MAX_ELEMENTS picks by size). This runs the compiled
training step of benchmarks.bench_train three ways beside the plain PyTorch step, interleaved in
one process: every op as a custom op, every op as its composite, and the shipped threshold. The
speed ratios against plain (above 1: faster) show where the threshold should sit. Nothing is
asserted.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_train import make_step
from benchmarks.harness import isolate_inductor_cache, pin_cpu_allocator
from benchmarks.train_ab import WARMUP_STEPS, interleaved_seconds, report_result, speed_ratio
from fastvae.ops import common

SHIPPED = common.COMPILED_CPU_COMPOSITE_MAX_ELEMENTS
VARIANTS = {"custom op": 0, "composite": 1 << 62, "shipped": SHIPPED}


def variant_step(max_elements: int, amp: bool, batch_size: int, quick: bool):
    """fastvae's compiled step, traced and run with the threshold at max_elements. The threshold is
    read when a graph is traced, not guarded; each variant keeps its own graph because it is its
    own torch.compile, whose cache entries dynamo keeps apart from the others'."""
    step = make_step("fastvae", "default", amp, torch.device("cpu"), quick=quick, batch_size=batch_size)

    def run() -> None:
        common.COMPILED_CPU_COMPOSITE_MAX_ELEMENTS = max_elements
        step()

    return run


def measure(batch_size: int, amp: bool, blocks: int, steps_per_block: int, quick: bool = False) -> list[dict]:
    """One setting: each variant's speed against plain PyTorch. quick: dynamo's eager backend instead
    of inductor (a check that it runs, in seconds; its ratios mean nothing)."""
    torch._dynamo.reset()  # a new batch size must not turn the graphs dynamic
    cpu = torch.device("cpu")
    steps = {"plain": make_step("plain", "default", amp, cpu, quick=quick, batch_size=batch_size)}
    steps.update({name: variant_step(value, amp, batch_size, quick) for name, value in VARIANTS.items()})
    try:
        for step in steps.values():
            for _ in range(WARMUP_STEPS):
                step()
        seconds = interleaved_seconds(steps, blocks, steps_per_block, torch.device("cpu"))
    finally:
        common.COMPILED_CPU_COMPOSITE_MAX_ELEMENTS = SHIPPED
    return [
        {
            "variant": name,
            "max_elements": value,
            "batch_size": batch_size,
            "amp": amp,
            "blocks": blocks,
            "steps_per_block": steps_per_block,
            **speed_ratio(seconds["plain"], seconds[name]),
        }
        for name, value in VARIANTS.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="128,1024", help="comma-separated (default 128,1024)")
    parser.add_argument("--blocks", type=int, default=60, help="block rounds (default 60)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per block (default 5)")
    parser.add_argument("--json", default=None, help="append each result as one JSON line to this file")
    args = parser.parse_args(argv)
    allocator, cache = pin_cpu_allocator(), isolate_inductor_cache()
    print(
        f"compiled CPU training step, {torch.get_num_threads()} threads, {args.blocks} block rounds of "
        f"{args.steps} steps, {allocator}, inductor cache: {cache}; shipped threshold {SHIPPED} elements"
    )
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for amp in (False, True):
            for result in measure(batch_size, amp, args.blocks, args.steps):
                label = f"batch {batch_size:5d} {'AMP ' if amp else 'fp32'} {result['variant']:9s}"
                report_result(label, result, args.json)


if __name__ == "__main__":
    main()
