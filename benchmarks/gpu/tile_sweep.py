"""How fast the Bernoulli likelihood kernel (elbo_loss's pass over [B, D]) runs with each tile and
warp count, against the device's copy: the data for choosing the GPU tiles.

    python -m benchmarks.gpu.tile_sweep [--batch 65536] [--data 784] [--dtype fp32|bf16]
    TRITON_INTERPRET=1 python -m benchmarks.gpu.tile_sweep --smoke     # the script itself, on a CPU

The kernel runs as elbo_loss runs it (per-row sums, the gradient written); each configuration
(BLOCK_B rows of BLOCK_D columns per program, num_warps) is timed with triton.testing.do_bench
and given as GB/s of the bytes it must move (logits and target read, the gradient written) and
as a share of a device-to-device copy of the same bytes. The shipped tile (triton_helpers.tile)
is marked. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import triton
import triton.language as tl

from fastvae.ops.bernoulli.triton import _bernoulli_fwd_kernel
from fastvae.ops.triton_helpers import LAUNCH_OPTIONS, tile

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configurations(smoke: bool) -> list[tuple[int, int, int]]:
    """(BLOCK_B, BLOCK_D, num_warps): every tile of 256 to 8192 elements with a power-of-two
    side, at 2, 4 and 8 warps."""
    if smoke:
        return [(1, 64, 4), (4, 64, 8)]
    out = []
    for block_b, block_d, warps in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024), (2, 4, 8)):
        if 256 <= block_b * block_d <= 8192:
            out.append((block_b, block_d, warps))
    return out


def seconds(fn, device: torch.device) -> float:
    """Median seconds per call: triton's do_bench on CUDA, a few timed calls elsewhere."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--data", type=int, default=784)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--smoke", action="store_true", help="two tiles at 8 x 40: checks the script on a CPU")
    args = parser.parse_args(argv)
    batch, data = (8, 40) if args.smoke else (args.batch, args.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    logits = torch.randn(batch, data, device=device).to(dtype)
    target = (torch.rand(batch, data, device=device) < 0.5).to(dtype)
    logp = torch.empty(batch, device=device)
    dlogits = torch.empty_like(logits)
    moved = 3 * logits.numel() * logits.element_size() + logp.numel() * 4
    source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    copy = seconds(lambda: torch.empty_like(source).copy_(source), device)  # reads and writes moved / 2 each
    print(
        f"{device} {torch.cuda.get_device_name(0) if device.type == 'cuda' else ''}, batch {batch} x {data}, "
        f"{args.dtype}: copy {moved / copy / 1e9:.0f} GB/s"
    )
    shipped = (*tile(data), LAUNCH_OPTIONS["num_warps"])
    rows = []
    for block_b, block_d, warps in configurations(args.smoke):

        def run(block_b=block_b, block_d=block_d, warps=warps):
            _bernoulli_fwd_kernel[(triton.cdiv(batch, block_b),)](
                logits,
                target,
                logp,
                dlogits,
                batch,
                data,
                batch,
                data,
                data,
                -1.0 / batch,
                ELEMENTWISE=False,
                COMPUTE_GRAD=True,
                COMPUTE=tl.float32,
                BLOCK_B=block_b,
                BLOCK_D=block_d,
                num_warps=warps,
                maxnreg=LAUNCH_OPTIONS["maxnreg"],
            )

        rows.append((seconds(run, device), block_b, block_d, warps))
    print(f"{'BLOCK_B':>7} {'BLOCK_D':>7} {'warps':>5} {'time':>10} {'GB/s':>7} {'% copy':>7}")
    for elapsed, block_b, block_d, warps in sorted(rows):
        mark = "  <- shipped" if (block_b, block_d, warps) == shipped else ""
        print(
            f"{block_b:7d} {block_d:7d} {warps:5d} {elapsed * 1e6:8.1f} us {moved / elapsed / 1e9:7.0f} "
            f"{100 * copy / elapsed:6.0f}%{mark}"
        )


if __name__ == "__main__":
    main()
