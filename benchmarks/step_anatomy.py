"""Where a compiled training step's time goes, fastvae against plain PyTorch, in one process.

    python -m benchmarks.step_anatomy [--amp] [--blocks 300] [--steps 5] [--json OUT]

train_ab gives the whole step's ratio; this splits each step of the compiled objective (the
default torch.compile mode, on the CPU) into four parts, timed one after another:
  guards     dynamo's check of the guards of the objective's compiled frame, the first thing a
             call of the compiled objective does; timed alone, at the start of the step, when
             the step before (backward, Adam) has left the caches cold
  forward    the compiled objective's call, its guards now checked warm
  backward   loss.backward()
  optimizer  zero_grad and the Adam step
The steps run in blocks interleaved as in train_ab (benchmarks.train_ab.interleaved_seconds),
and each part's median over all steps is printed for both providers with their difference.

The guard check is reached through dynamo's debugging accessor for a frame's cache entries
(torch._dynamo.eval_frame._debug_get_cache_entry_list), present in torch 2.11 and 2.14. Nothing
is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.bench_train import BATCH_SIZE, PROVIDERS, make_parts
from benchmarks.harness import isolate_inductor_cache, pin_cpu_allocator
from benchmarks.train_ab import WARMUP_STEPS, interleaved_seconds

PARTS = ("guards", "forward", "backward", "optimizer")


def frame_guards(objective, x, kl_weight):
    """A function checking the guards of the compiled objective's forward frame against its
    arguments, as dynamo does before each call: those of the first cache entry of the frame's code
    whose guards pass for these arguments, the one dynamo runs (the objective must have run once)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    module = objective._orig_mod
    code = type(module).forward.__code__
    names = code.co_varnames[: code.co_argcount]  # self, x, kl_weight

    def frame_locals(x, kl_weight) -> dict:
        return dict(zip(names, (module, x, kl_weight)))

    for entry in _debug_get_cache_entry_list(code):
        if entry.guard_manager.check(frame_locals(x, kl_weight)):
            guard_manager = entry.guard_manager
            return lambda x, kl_weight: guard_manager.check(frame_locals(x, kl_weight))
    raise RuntimeError(f"no compiled entry of {code.co_qualname} accepts these arguments: the step recompiles")


def timed_step(provider: str, amp: bool, batch_size: int, parts: dict, quick: bool = False):
    """A training step that appends each part's seconds to parts[provider][part]; quick: dynamo with
    the eager backend (guards and all, in seconds instead of inductor's minute: for tests)."""
    objective, optimizer, x, weight = make_parts(provider, "default", torch.device("cpu"), quick, batch_size)
    seconds = parts[provider]
    guards = []

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if guards:
                start = time.perf_counter()
                if not guards[0](x, weight):
                    raise RuntimeError("the objective's guards failed: it would recompile, and the split means nothing")
                seconds["guards"].append(time.perf_counter() - start)
            start = time.perf_counter()
            loss, _ = objective(x, weight)
            forward_done = time.perf_counter()
            if not guards:  # under the same autocast state: dynamo guards on it
                guards.append(frame_guards(objective, x, weight))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward_done = time.perf_counter()
        optimizer.step()
        seconds["forward"].append(forward_done - start)
        seconds["backward"].append(backward_done - forward_done)
        seconds["optimizer"].append(time.perf_counter() - backward_done)

    return step


def measure(amp: bool, batch_size: int, blocks: int, steps_per_block: int, quick: bool = False) -> dict:
    """{provider: {part: median µs per step}}, the steps interleaved in blocks as in train_ab."""
    parts = {provider: {part: [] for part in PARTS} for provider in PROVIDERS}
    steps = {provider: timed_step(provider, amp, batch_size, parts, quick) for provider in PROVIDERS}
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    for timings in parts.values():  # the warm-up's, and the first step has no guard time
        for seconds in timings.values():
            seconds.clear()
    interleaved_seconds(steps, blocks, steps_per_block, torch.device("cpu"))
    return {p: {part: statistics.median(parts[p][part]) * 1e6 for part in PARTS} for p in PROVIDERS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (default: fp32)")
    parser.add_argument("--blocks", type=int, default=300, help="block pairs (default 300)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per block (default 5)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"(default {BATCH_SIZE})")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    isolate_inductor_cache()
    allocator = pin_cpu_allocator()
    medians = measure(args.amp, args.batch_size, args.blocks, args.steps)
    print(
        f"compiled training step, batch {args.batch_size}, {'bf16 autocast' if args.amp else 'fp32'}, "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, {allocator}; "
        f"median µs per step over {args.blocks} block pairs of {args.steps} steps"
    )
    for part in PARTS:
        plain, fastvae = medians["plain"][part], medians["fastvae"][part]
        print(f"  {part:9s}  plain {plain:8.1f}  fastvae {fastvae:8.1f}  fastvae - plain {fastvae - plain:+7.1f}")
    if args.json:
        record = {
            "amp": args.amp,
            "batch_size": args.batch_size,
            "blocks": args.blocks,
            "steps_per_block": args.steps,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "median_us": medians,
        }
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
