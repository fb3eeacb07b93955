"""Compile every Triton kernel specialization for real NVIDIA GPUs, without a GPU, and read its resources.

    python -m benchmarks.triton_resources [--arch 80 90] [--workers 2] [--json OUT.json]

Each family's triton.py lists the specializations its launchers can request
(`specializations()`: pointer dtypes, constexpr flags, the tile menu). Triton compiles each
to PTX and a cubin for the target, and `ptxas -v` (which ships in the triton wheel) reports
the PTX's registers per thread, its stack frame and its spill stores and loads. The lists are
compiled for any argument values; a launch also specializes on them (16-byte-aligned pointers
and integers divisible by 16 get vectorized memory accesses, integers equal to 1 become
constants), so every kernel is also compiled as the launchers start it at a model's sizes
(benchmarks/recording_driver.py's launched_kernels: batch 128 x 784, latent 32, 16 samples),
and the width of each of those kernels' global loads and stores is counted in its PTX.
tests/test_triton_compile.py runs both and fails on a compile error or a spill; the JSON
goes into benchmarks/results/. (A stack frame without spills is float64 math calling
libdevice functions, not a spill.)

The compiles run in worker processes without TRITON_INTERPRET (under the interpreter
triton.jit returns no compilable kernel), `--workers` at a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
from pathlib import Path

ARCHS = (80, 90)
WARP_SIZE = 32
_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def ptxas_resources(ptx: str, arch: str) -> dict:
    """Registers, stack frame and spill bytes of `ptx` for `arch` (e.g. sm_90a), from ptxas -v."""
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as source:
        source.write(ptx)
        source.flush()
        report = subprocess.run(
            [str(_ptxas()), f"-arch={arch}", "-v", source.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    frame = _FRAME.search(report)
    return {
        "registers": int(_REGISTERS.search(report).group(1)),
        "stack_bytes": int(frame.group(1)),
        "spill_store_bytes": int(frame.group(2)),
        "spill_load_bytes": int(frame.group(3)),
    }


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.nc)?(?:\.v(\d))?\.b(\d+)")


def global_accesses(ptx: str) -> dict[str, dict[int, int]]:
    """How wide the kernel's global memory accesses are: {"loads": {bytes: count}, "stores": ...},
    counted in the PTX (each instruction once; a 16-byte access is a vectorized one)."""
    out: dict[str, dict[int, int]] = {"loads": {}, "stores": {}}
    for kind, lanes, bits in _GLOBAL_ACCESS.findall(ptx):
        width = int(lanes or 1) * int(bits) // 8
        counts = out["loads" if kind == "ld" else "stores"]
        counts[width] = counts.get(width, 0) + 1
    return out


def _specializations() -> list:
    from fastvae.ops.registry import FAMILIES

    return [s for family in FAMILIES for s in family.module("triton").specializations()]


def _compile_chunk(indices: list[int], archs: tuple[int, ...]) -> list[dict]:
    """Compile specializations `indices` (positions in _specializations()) for each arch (worker side)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastvae.ops.triton_helpers import LAUNCH_OPTIONS

    specs = _specializations()
    out = []
    for index in indices:
        spec = specs[index]
        for arch in archs:
            row = {"kernel": spec.kernel.fn.__name__, "specialization": spec.name, "arch": f"sm_{arch}"}
            try:
                compiled = triton.compile(
                    ASTSource(spec.kernel, spec.signature(), spec.constexprs),
                    target=GPUTarget("cuda", arch, WARP_SIZE),
                    options=LAUNCH_OPTIONS,
                )
                assert compiled.asm["cubin"], "no cubin"
                row.update(ptxas_resources(compiled.asm["ptx"], _ptx_target(compiled.asm["ptx"])), error=None)
            except Exception as error:  # noqa: BLE001 - every failure is reported, with its kind
                row.update(error=f"{type(error).__name__}: {error}"[:2000])
            out.append(row)
    return out


def _ptx_target(ptx: str) -> str:
    """The .target of a PTX file (sm_90a for Hopper kernels that use its instructions)."""
    return re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)


def compile_all(archs: tuple[int, ...] = ARCHS, workers: int = 2) -> list[dict]:
    """One row per (specialization, arch): registers, stack/shared/local bytes, or the error."""
    count = len(_specializations()) if os.environ.get("TRITON_INTERPRET") != "1" else _count_in_subprocess()
    chunks = [list(range(i, count, workers)) for i in range(workers)]
    return _in_compiling_workers(workers, _compile_chunk, chunks, [archs] * workers)


def launched_resources(archs: tuple[int, ...] = ARCHS) -> list[dict]:
    """One row per kernel the launchers start at a model's sizes (recording_driver.launched_kernels)
    and arch, compiled as those launches compile it: registers, stack and spill bytes. One worker
    process per arch."""
    return _in_compiling_workers(len(archs), _launched_rows, archs)


def _in_compiling_workers(workers: int, function, *arguments) -> list[dict]:
    """The rows of `function` mapped over `arguments` in `workers` spawned processes where Triton
    compiles real kernels (TRITON_INTERPRET=0, which they inherit), sorted by specialization, arch."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = pool.map(function, *arguments)
            return sorted((row for rows in results for row in rows), key=lambda r: (r["specialization"], r["arch"]))
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _launched_rows(arch: int) -> list[dict]:
    """launched_resources for one arch (worker side)."""
    from benchmarks.recording_driver import MODEL_SIZES, launched_kernels

    sizes = " x ".join(str(MODEL_SIZES[axis]) for axis in ("batch", "data"))
    rows = []
    for launch in launched_kernels(MODEL_SIZES, arch):
        constexprs = " ".join(f"{name}={value}" for name, value in sorted(launch["constexprs"].items()))
        pointers = " ".join(sorted(set(launch["pointers"].values())))
        ones = f", equal to 1: {' '.join(launch['ones'])}" if launch["ones"] else ""
        row = {
            "kernel": launch["kernel"],
            "specialization": f"{launch['kernel']} launched at {sizes} ({pointers} {constexprs}{ones})",
            "arch": f"sm_{arch}",
            "pointers": launch["pointers"],
            "divisible": launch["divisible"],
            "ones": launch["ones"],
        }
        row.update(ptxas_resources(launch["ptx"], _ptx_target(launch["ptx"])), error=None)
        row.update(global_accesses(launch["ptx"]))
        rows.append(row)
    return rows


def _count_in_subprocess() -> int:
    """The number of specializations, counted where triton is not interpreting."""
    code = "from benchmarks.triton_resources import _specializations; print(len(_specializations()))"
    done = subprocess.run(
        [os.sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, TRITON_INTERPRET="0"),
    )
    return int(done.stdout.strip())


def summary(rows: list[dict]) -> list[str]:
    """Per kernel and arch: how many specializations, the most registers, any spill or error."""
    lines = []
    for kernel, arch in sorted({(r["kernel"], r["arch"]) for r in rows}):
        group = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
        ok = [r for r in group if r["error"] is None]
        spills = [r for r in ok if r["spill_store_bytes"] or r["spill_load_bytes"]]
        registers = max((r["registers"] for r in ok), default=0)
        lines.append(
            f"{kernel:34s} {arch}: {len(group):3d} specializations, at most {registers} registers, "
            f"{len(spills)} spilling, {len(group) - len(ok)} failed"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (default 80 90)")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="write every row to this JSON file")
    args = parser.parse_args(argv)
    rows = compile_all(tuple(args.arch), args.workers)
    launched = launched_resources(tuple(args.arch))
    print("every listed specialization, for any argument values:")
    print("\n".join(summary(rows)))
    print("as launched at a model's sizes (aligned pointers, sizes divisible by 16):")
    print("\n".join(summary(launched)))
    if args.json:
        import triton

        text = json.dumps({"triton": triton.__version__, "rows": rows, "launched": launched}, indent=1)
        args.json.write_text(text + "\n")
    if any(r["error"] or r["spill_store_bytes"] or r["spill_load_bytes"] for r in rows + launched):
        raise SystemExit("some specializations failed to compile or spill (see above)")


if __name__ == "__main__":
    main()
