"""Interleaved A/B of a whole training step: plain PyTorch loop against fastvae, in one process.

    python -m benchmarks.train_ab [--blocks 150] [--steps 5] [--compile default|reduce-overhead]
                                  [--batch-size 128] [--no-optimizer] [--device cpu|cuda] [--json OUT]
                                  [--cuda-composite]
    python -m benchmarks.train_ab --report OUT          # the settings measured into OUT

bench_train.py times each provider in its own pytest case, minutes apart; on a shared machine
the load drifts between cases by more than the difference being measured. Here the two steps
(benchmarks.bench_train.make_step, the closures bench_train times) alternate in blocks of a few
steps, the order flipping every block, and each block pair gives one ratio plain_time /
fastvae_time: drift hits both sides of a pair alike. The median ratio and its quartiles are
printed for fp32 and AMP. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.bench_train import BATCH_SIZE, COMPILE_MODES, PROVIDERS, make_step
from benchmarks.harness import isolate_inductor_cache, pin_cpu_allocator
from fastvae.ops import common

WARMUP_STEPS = 20
CUDA_COMPOSITE_UNLIMITED = 1 << 62


def interleaved_seconds(steps: dict, blocks: int, steps_per_block: int, device: torch.device) -> dict:
    """Each step's seconds per step, one value per block: the steps run one after another in
    blocks of steps_per_block, their order reversed every block, so drift hits all alike."""
    names = list(steps)
    seconds = {name: [] for name in names}
    for block in range(blocks):
        for name in names if block % 2 else names[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(steps_per_block):
                steps[name]()
            seconds[name].append((time.perf_counter() - start) / steps_per_block)
    return seconds


def speed_ratio(baseline: list, other: list) -> dict:
    """Per block: baseline seconds / other seconds (above 1: `other` is faster); their median and
    quartiles, and each side's median milliseconds per step."""
    low, median, high = statistics.quantiles([b / o for b, o in zip(baseline, other)], n=4)
    return {
        "plain_ms": statistics.median(baseline) * 1e3,
        "fastvae_ms": statistics.median(other) * 1e3,
        "ratio_median": median,
        "ratio_q1": low,
        "ratio_q3": high,
    }


def measure(
    compile_mode: str,
    amp: bool,
    batch_size: int,
    blocks: int,
    steps_per_block: int,
    device: torch.device,
    optimize: bool = True,
) -> dict:
    """One setting's paired measurement, as a dict (what --json writes, one per line)."""
    steps = {
        name: make_step(name, compile_mode, amp, device, optimize=optimize, batch_size=batch_size) for name in PROVIDERS
    }
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    seconds = interleaved_seconds(steps, blocks, steps_per_block, device)
    return {
        "compile": compile_mode,
        "amp": amp,
        "batch_size": batch_size,
        "optimizer": optimize,
        "blocks": blocks,
        "steps_per_block": steps_per_block,
        "device": str(device),
        # torch's CPU vector ISA (ATEN_CPU_CAPABILITY changes it): its math functions differ in speed
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **speed_ratio(seconds["plain"], seconds["fastvae"]),
    }


def report_result(label: str, result: dict, json_path: str | None) -> None:
    """Print one measured setting (a speed_ratio dict with its setting) and append it to json_path."""
    print(
        f"  {label}: plain {result['plain_ms']:.2f} ms, fastvae {result['fastvae_ms']:.2f} ms per step; "
        f"fastvae speed / plain: median {result['ratio_median']:.3f}x "
        f"(quartiles {result['ratio_q1']:.3f} to {result['ratio_q3']:.3f})",
        flush=True,
    )
    if json_path:
        with open(json_path, "a") as handle:
            handle.write(json.dumps(result) + "\n")


def print_report(path: str) -> None:
    """The settings measured into a --json file, one line each."""
    with open(path) as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    print(f"training step A/B ({len(rows)} settings; fastvae speed / plain, median of paired blocks)")
    for r in rows:
        # The ATen CPU kernels' instruction set matters only where the step runs on the CPU.
        where = " ".join(filter(None, (r["device"], r.get("cpu_capability") if r["device"] == "cpu" else None)))
        mode = r["compile"] + (" composite" if r.get("cuda_composite") else "")
        print(
            f"  batch {r['batch_size']:5d}, {mode:25s}, {'AMP ' if r['amp'] else 'fp32'}: plain "
            f"{r['plain_ms']:.3f} ms, fastvae {r['fastvae_ms']:.3f} ms; {r['ratio_median']:.3f}x "
            f"(quartiles {r['ratio_q1']:.3f} to {r['ratio_q3']:.3f}), {where}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--report", default=None, metavar="JSONL", help="print the settings a --json file holds, measure nothing"
    )
    parser.add_argument("--blocks", type=int, default=150, help="block pairs (default 150)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per block (default 5)")
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="eager",
        help="torch.compile mode of both steps' forward (default: eager, no compile)",
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"(default {BATCH_SIZE})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-optimizer",
        action="store_true",
        help="time forward and backward only, without the Adam step that dilutes the loss side",
    )
    parser.add_argument(
        "--cuda-composite",
        action="store_true",
        help="compiled CUDA graphs hold each fastvae op as its composite in torch ops, which inductor "
        "fuses, instead of the op's node (fastvae.ops.common.COMPILED_CUDA_COMPOSITE_MAX_ELEMENTS, "
        "unlimited); needs --device cuda and a compile mode",
    )
    parser.add_argument("--json", default=None, help="append each setting's result as one JSON line to this file")
    args = parser.parse_args(argv)
    if args.report:
        print_report(args.report)
        return
    device = torch.device(args.device)
    if args.compile == "reduce-overhead" and device.type != "cuda":
        parser.error("--compile reduce-overhead captures CUDA graphs: it needs --device cuda")
    if args.cuda_composite:
        if device.type != "cuda" or args.compile == "eager":
            parser.error("--cuda-composite changes what compiled CUDA graphs hold: it needs --device cuda, --compile")
        common.COMPILED_CUDA_COMPOSITE_MAX_ELEMENTS = CUDA_COMPOSITE_UNLIMITED
    # As in the pytest suite: with glibc's adaptive thresholds the AMP ratio's quartiles
    # spanned 0.80 to 1.23 on a 2-core CPU; fixed, 0.98 to 1.05.
    allocator = pin_cpu_allocator()
    cache = isolate_inductor_cache()
    print(
        f"training step{' without the optimizer' if args.no_optimizer else ''}, batch {args.batch_size}, "
        f"{device}, {torch.get_num_threads()} threads, compile: {args.compile}, {args.blocks} block pairs of "
        f"{args.steps} steps, {allocator}, inductor cache: {cache}"
    )
    for amp in (False, True):
        result = measure(args.compile, amp, args.batch_size, args.blocks, args.steps, device, not args.no_optimizer)
        result["cuda_composite"] = args.cuda_composite
        report_result(f"{'AMP ' if amp else 'fp32'}", result, args.json)


if __name__ == "__main__":
    main()
