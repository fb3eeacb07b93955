"""How one benchmark case is built, timed and annotated.

An op is the registry's `OpSpec` (inputs, outputs, the fastvae call and the plain PyTorch
competitor). `run_case` builds the inputs, picks the provider's callable, times the mode
with pytest-benchmark (synchronizing the device inside the timed function) and records in
``extra_info`` the minimum bytes the op must move, the effective bandwidth, the copy
bandwidth of the device measured beside the case and the peak extra memory where the
device reports it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable

import pytest
import torch

from benchmarks.axes import Case
from fastvae.ops.spec import Arg, OpSpec
from fastvae.train.inductor_cache import isolate_inductor_cache

__all__ = ["isolate_inductor_cache", "pin_cpu_allocator", "run_case"]

WARMUP_CALLS = 1  # the first call compiles (torch.compile, Triton autotune); sizing the rounds adds 3 more
MIN_ROUNDS = 5
MAX_ROUNDS = 2000
COPY_BUFFER_BYTES = 128 * 2**20  # several times any CPU's L3 or GPU's L2, so copy hits DRAM/HBM
COPY_REPEATS = 6


# glibc malloc settings for the benchmark process (see pin_cpu_allocator).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
PINNED_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks up to 32 MiB come from the heap
PINNED_TRIM_THRESHOLD = 2**30  # freed heap memory stays with the process up to 1 GiB


UNPINNED_ALLOCATOR = "the C library's default allocator (thresholds not fixed)"


def pin_cpu_allocator() -> str:
    """Fix glibc malloc's thresholds for the whole benchmark process; returns what was set
    (recorded in the JSON), or UNPINNED_ALLOCATOR where the C library is not glibc.

    By default glibc adapts its mmap and trim thresholds to the blocks freed so far, so
    whether a 12.8 MB buffer (a [4096, 784] float32 gradient) is reused or comes back as
    fresh pages, about 3,000 page faults per call, depends on the allocation history of
    the process. The same case then timed 2.2 ms in one process and 5.7 ms in the next
    (2-core CPU, vae_loss 4096x784, either fastvae version). Fixed thresholds give every
    provider the same allocator, whatever ran before it. Users get the same behaviour with
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824,
    or with jemalloc or tcmalloc as PyTorch's CPU performance guide suggests."""
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return UNPINNED_ALLOCATOR
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not (
        libc.mallopt(_M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, PINNED_TRIM_THRESHOLD)
    ):
        return UNPINNED_ALLOCATOR
    return f"glibc malloc mmap_threshold={PINNED_MMAP_THRESHOLD} trim_threshold={PINNED_TRIM_THRESHOLD}"


# ---------------------------------------------------------------------------
# Inputs and the bytes an op must move at minimum.
# ---------------------------------------------------------------------------
def _dtype(arg: Arg, case: Case) -> torch.dtype:
    return {"param": case.precision.param, "target": case.precision.target, "loss": torch.float32}[arg.kind]


def min_bytes(spec: OpSpec, case: Case) -> int:
    """Bytes the op must move at least in `case.mode`, each tensor at its own dtype (OpSpec.min_bytes)."""
    return spec.min_bytes(case.sizes, case.precision.param, case.precision.target, case.mode)


def largest_input_bytes(spec: OpSpec, case: Case) -> int:
    return max(math.prod(arg.shape(case.sizes)) * _dtype(arg, case).itemsize for arg in spec.inputs)


def make_inputs(spec: OpSpec, case: Case, device: torch.device) -> list[torch.Tensor]:
    """Fresh random inputs of `case`; the differentiable ones require grad."""
    return [arg.make(case.sizes, _dtype(arg, case), device).requires_grad_(arg.differentiable) for arg in spec.inputs]


def make_upstream(spec: OpSpec, case: Case, device: torch.device) -> list[torch.Tensor]:
    """The gradient flowing into each output: 1 for a scalar loss, random otherwise (an upstream
    gradient that is not 1 is what a real graph hands back)."""
    grads = []
    for arg in spec.outputs:
        shape, dtype = arg.shape(case.sizes), _dtype(arg, case)
        grads.append(
            torch.ones((), dtype=dtype, device=device) if not shape else torch.randn(shape, device=device).to(dtype)
        )
    return grads


# ---------------------------------------------------------------------------
# Device helpers.
# ---------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer around a call measures the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Best-of-N GB/s of copying one large buffer into another on `device` (read + write):
    the practical ceiling for a memory-bound op. Measured again beside every case (about
    0.1 s on a CPU): on a shared VM it read 30 GB/s in one process and 42 GB/s in one a few
    minutes later, so one figure for a whole run mixes the load of different moments."""
    numel = COPY_BUFFER_BYTES // 4
    src = torch.ones(numel, device=device)  # written, so its pages are real and not the shared zero page
    dst = torch.zeros_like(src)
    best = math.inf
    for _ in range(COPY_REPEATS + 1):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * COPY_BUFFER_BYTES / best / 1e9


# ---------------------------------------------------------------------------
# Providers and modes.
# ---------------------------------------------------------------------------
def provider_unavailable(case: Case, device: torch.device) -> str | None:
    """Why this case's provider cannot run on `device`, or None."""
    if case.provider.kind != "fastvae":
        return None
    from fastvae.backend import unavailable_reason

    return unavailable_reason(case.provider.backend, device)


def provider_fn(spec: OpSpec, case: Case) -> Callable:
    """The provider's callable of the op's inputs (sizes no input carries, like samples, bound)."""
    fn = _provider_fn(spec, case)
    size_arguments = spec.size_arguments(case.sizes)
    return functools.partial(fn, **size_arguments) if size_arguments else fn


def _provider_fn(spec: OpSpec, case: Case) -> Callable:
    if case.provider.kind == "eager":
        return spec.eager
    if case.provider.kind == "compiled":
        # A fresh compile per case, specialized to its shapes as a user with fixed shapes
        # gets it; reset drops other shapes' entries so dynamo never hits its recompile
        # limit and silently falls back to eager. Inductor's disk cache makes repeats cheap.
        torch._dynamo.reset()
        return torch.compile(spec.eager, dynamic=False)
    return spec.fastvae


def provider_context(case: Case, device: torch.device) -> contextlib.AbstractContextManager:
    """The backend choice (fastvae) and autocast (AMP) every timed call runs under; the
    backend also decides the backward, so backward calls run under it too."""
    stack = contextlib.ExitStack()
    if case.provider.kind == "fastvae":
        import fastvae

        stack.enter_context(fastvae.use_backend(case.provider.backend))
    if case.precision.autocast is not None:
        stack.enter_context(torch.autocast(device.type, dtype=case.precision.autocast))
    return stack


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def mode_callables(spec: OpSpec, case: Case, device: torch.device):
    """(target, setup) for pytest-benchmark's pedantic: setup runs untimed before each round.

    backward times only torch.autograd.grad over a forward graph that setup built (a
    graph is freed by its backward, and compiled backwards refuse retain_graph)."""
    fn = provider_fn(spec, case)
    args = tuple(make_inputs(spec, case, device))
    upstream = make_upstream(spec, case, device)
    wrt = tuple(x for x in args if x.requires_grad)

    def forward():
        with provider_context(case, device):
            out = fn(*args)
        synchronize(device)
        return out

    def backward(outputs):
        with provider_context(case, device):
            grads = torch.autograd.grad(outputs, wrt, upstream)
        synchronize(device)
        return grads

    def full():
        with provider_context(case, device):
            grads = torch.autograd.grad(_as_tuple(fn(*args)), wrt, upstream)
        synchronize(device)
        return grads

    if case.mode == "forward":
        return forward, None
    if case.mode == "full":
        return full, None
    return backward, lambda: ((_as_tuple(forward()),), {})


def _call(target, setup):
    args, kwargs = setup() if setup else ((), {})
    return target(*args, **kwargs)


def _seconds_per_call(target, setup) -> float:
    """The fastest of a few untimed calls, to size the number of rounds."""
    best = math.inf
    for _ in range(3):
        args, kwargs = setup() if setup else ((), {})
        start = time.perf_counter()
        target(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def peak_extra_bytes(target, setup, device: torch.device) -> int | None:
    """Memory the call allocates beyond what exists before it (inputs, saved graph),
    outputs included; None where the device does not report it (the CPU allocator)."""
    if device.type != "cuda":
        return None
    args, kwargs = setup() if setup else ((), {})
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    target(*args, **kwargs)
    return torch.cuda.max_memory_allocated(device) - before


def run_case(benchmark, spec: OpSpec, case: Case, device: torch.device, seconds: float) -> None:
    """Warm up, then time `case` for about `seconds` (at least MIN_ROUNDS rounds) and record
    the figures the report reads. With --benchmark-disable it runs each call once."""
    reason = provider_unavailable(case, device)
    if reason is not None:
        pytest.skip(f"{case.provider.name}: {reason}")
    target, setup = mode_callables(spec, case, device)
    if benchmark.disabled:
        benchmark.pedantic(target, setup=setup)
        return
    try:
        for _ in range(WARMUP_CALLS):
            _call(target, setup)
        rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(seconds / _seconds_per_call(target, setup))))
        benchmark.pedantic(target, setup=setup, rounds=rounds)
        peak = peak_extra_bytes(target, setup, device)
    except torch.OutOfMemoryError as error:
        pytest.skip(f"out of memory on {device_name(device)}: {error}")
    record(benchmark, spec, case, device, peak)


def record(benchmark, spec: OpSpec, case: Case, device: torch.device, peak: int | None) -> None:
    """Everything the report needs, in extra_info (pytest-benchmark stores it in the JSON)."""
    median = benchmark.stats.stats.median
    nbytes = min_bytes(spec, case)
    copy = copy_bandwidth_gbps(device)
    gbps = nbytes / median / 1e9
    largest_input = largest_input_bytes(spec, case)
    benchmark.extra_info.update(
        {
            "op": case.op,
            "mode": case.mode,
            "provider": case.provider.name,
            "backend": case.provider.backend,
            "device": device.type,
            "device_name": device_name(device),
            "batch": case.batch,
            "data": case.data,
            "latent": case.latent,
            "samples": case.samples,
            "precision": case.precision.name,
            "param_dtype": str(case.precision.param).removeprefix("torch."),
            "target_dtype": str(case.precision.target).removeprefix("torch."),
            "autocast": None
            if case.precision.autocast is None
            else str(case.precision.autocast).removeprefix("torch."),
            "min_bytes": nbytes,
            "gbps": gbps,
            "copy_gbps": copy,
            "pct_of_copy": 100.0 * gbps / copy,
            "largest_input_bytes": largest_input,
            "peak_extra_bytes": peak,
            "peak_memory_note": None if peak is not None else f"not reported by the {device.type} allocator",
        }
    )
