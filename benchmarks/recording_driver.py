"""A stand-in for Triton's CUDA driver on a machine without a GPU: the GPU launch path, minus the GPU.

With it active, a launcher's `kernel[grid](...)` goes through Triton's real dispatch for NVIDIA
targets (`JITFunction.run`: argument binding and specialization, the kernel cache, compiling
for sm_90 with the ptxas in the triton wheel, the launch metadata), and only the last step
differs: the driver neither loads the cubin nor starts it. Tensors are CPU tensors (Triton
reads their data pointers and dtypes, never their data).

Three uses, all where no GPU is:
  - the host time of fastvae's Triton launchers and of Triton's dispatch beneath them
    (benchmarks/triton_launch_cost.py): on a GPU a small VAE's step is bound by that time;
  - which specializations the launchers really request (launched_specializations;
    tests/test_triton_compile.py checks that each is on the kernels' `specializations()` lists,
    which CI compiles for real GPUs);
  - the kernels exactly as a launch at a model's sizes compiles them (launched_kernels): Triton
    also specializes on the arguments' values (pointers aligned to 16 bytes and integers
    divisible by 16 get vectorized loads and stores, integers equal to 1 become constants),
    which the lists, compiled for any value, do not show.

Needs a process where TRITON_INTERPRET is unset: under the interpreter `triton.jit` makes no
compilable kernel. The device stands in for an H100/H200 (sm_90) or an A100 (sm_80).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TARGET_ARCH = 90
SHARED_MEMORY_BYTES = 232448  # per block on sm_90, what an H100/H200 reports
MAX_THREADS_PER_BLOCK = 1024


class RecordingDriver:
    """Triton's driver interface as JITFunction.run and CompiledKernel use it, for one device of
    compute capability `arch` (sm_90 by default) that loads nothing and launches nothing."""

    def __init__(self, arch: int = TARGET_ARCH) -> None:
        self.arch = arch
        self.utils = _Utils()
        self.launcher_cls = _Launcher

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return divmod(self.arch, 10)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    @staticmethod
    def is_active() -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty


class _Launcher:
    """What CompiledKernel calls to start a kernel: here the launch ends, unmade."""

    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args) -> None:
        return None


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        """(module, function, registers, spills, max threads): placeholders, nothing is loaded."""
        return object(), object(), 0, 0, MAX_THREADS_PER_BLOCK

    def unload_module(self, module) -> None:
        """A kernel dropped from a cache unloads its module (triton 3.8): none was loaded."""

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_MEMORY_BYTES, "multiprocessor_count": 132, "warpSize": 32}


@contextlib.contextmanager
def recording_driver(arch: int = TARGET_ARCH) -> Iterator[RecordingDriver]:
    """Make a RecordingDriver for `arch` Triton's active driver for the block (and the previous one
    after it). Run it in a process of its own: the kernels it compiles stay in their
    JITFunction's caches, keyed by device 0 whatever the arch."""
    import os

    from triton.runtime.driver import driver as active

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the recording driver needs real Triton kernels: unset TRITON_INTERPRET")
    if torch.cuda.is_available():
        # Its placeholder handles would stay in the kernels' caches and reach the real GPU.
        raise RuntimeError("the recording driver stands in for a GPU where there is none; this machine has one")
    previous = active._active
    recorder = RecordingDriver(arch)
    active.set_active(recorder)
    try:
        yield recorder
    finally:
        active._active = previous


# Sizes for launched_specializations: each axis small, but the data wider than the narrow tile.
ODD_SIZES = {"batch": 4, "data": 100, "latent": 3, "samples": 2}
# A model's sizes for launched_kernels: every size a multiple of 16 (an MLP VAE on 28 x 28 images),
# so the launches request the vectorized forms a training run compiles.
MODEL_SIZES = {"batch": 128, "data": 784, "latent": 32, "samples": 16}


def launched_specializations(sizes: dict = ODD_SIZES) -> list[dict]:
    """Every kernel specialization fastvae's Triton launchers request when each public op runs
    forward and backward (see every_op_through_triton), with Triton's compile declined (its
    jit_cache_hook) and so nothing compiled. Each entry: {"kernel", "pointers": {name: type},
    "constexprs": {name: repr}}: the declared constexprs only, not the integers Triton makes
    constants for their value (1)."""
    requested: dict[str, dict] = {}

    def record(*, fn, compile, **_) -> bool:
        signature = compile["signature"]  # parameter name -> type ("*fp32", "i32", "constexpr", ...)
        pointers = {name: kind for name, kind in signature.items() if kind.startswith("*")}
        entry = {"kernel": fn.name, "pointers": pointers, "constexprs": _constants(fn, compile)[0]}
        requested[repr(entry)] = entry
        return True  # declined: no compile, no launch

    with _triton_hook("jit_cache_hook", record):
        every_op_through_triton(sizes)
    return list(requested.values())


def launched_kernels(sizes: dict = MODEL_SIZES, arch: int = TARGET_ARCH) -> list[dict]:
    """Every kernel fastvae's Triton launchers start when each public op runs forward and backward
    at `sizes` (see every_op_through_triton), compiled for `arch` as Triton's dispatch compiles it
    for those launches: the declared constexprs, and the value specializations (arguments
    divisible by 16, integers equal to 1). Each entry: {"kernel", "constexprs": {name: repr},
    "pointers": {name: type}, "divisible": the arguments specialized as divisible by 16,
    "ones": the integers made the constant 1, "ptx": the PTX}."""
    compiled: list[dict] = []

    def keep(*, key, fn, compile, **_) -> None:
        names = list(compile["signature"])
        attributes = compile["configs"][0]  # (parameter index,) -> [["tt.divisibility", 16]] or []
        constexprs, ones = _constants(fn, compile)
        kernel = fn.jit_function.device_caches[compile["device"]][0][key]
        compiled.append(
            {
                "kernel": fn.name,
                "constexprs": constexprs,
                "pointers": {name: kind for name, kind in compile["signature"].items() if kind.startswith("*")},
                "divisible": sorted(names[path[0]] for path, attribute in attributes.items() if attribute),
                "ones": ones,
                "ptx": kernel.asm["ptx"],
            }
        )

    from fastvae.ops.registry import FAMILIES

    with recording_driver(arch):
        # The kernels' caches are keyed by device (0, whatever the arch): emptied, so that each
        # launch compiles afresh for this arch and reaches the hook. (Under this driver, which
        # loaded them, the kernels dropped are unloaded: nothing to do.)
        for family in FAMILIES:
            for specialization in family.module("triton").specializations():
                specialization.kernel.device_caches.clear()
        with _triton_hook("jit_post_compile_hook", keep):
            every_op_through_triton(sizes, arch)
    return compiled


def every_op_through_triton(sizes: dict, arch: int = TARGET_ARCH) -> None:
    """Run each public op (the registry's specs, every reduction) forward and backward with every
    storage dtype pair (LIKELIHOOD_DTYPE_PAIRS: param, target) at `sizes`, on CPU tensors, through
    the triton backend and Triton's real dispatch for `arch` under the recording driver. Value
    checks are off and no output is read: no kernel runs."""
    import fastvae
    from fastvae import backend, validation
    from fastvae.ops.common import LIKELIHOOD_DTYPE_PAIRS
    from fastvae.ops.registry import op_specs

    previous_reason = backend._triton_reason
    previous_validation = validation.validate_args_enabled()
    backend._triton_reason = lambda device: None  # the triton backend on CPU tensors, interpreter unset
    fastvae.set_validate_args(False)  # the outputs are never written: nothing may read them
    try:
        with recording_driver(arch), fastvae.use_backend("triton"):
            for spec in op_specs():
                for param, target in LIKELIHOOD_DTYPE_PAIRS:
                    for reduction in spec.reductions or (None,):
                        _run_forward_and_backward(spec, sizes, param, target, reduction)
    finally:
        backend._triton_reason = previous_reason
        fastvae.set_validate_args(previous_validation)


@contextlib.contextmanager
def _triton_hook(name: str, hook) -> Iterator[None]:
    """triton.knobs.runtime.<name> set to `hook` for the block."""
    import triton

    previous = getattr(triton.knobs.runtime, name)
    setattr(triton.knobs.runtime, name, hook)
    try:
        yield
    finally:
        setattr(triton.knobs.runtime, name, previous)


def _constants(fn, compile: dict) -> tuple[dict[str, str], list[str]]:
    """A compile request's constants, split: the kernel's declared constexprs by name, as text, and
    the names of the integers Triton made constants for their value (1), which name no
    specialization of their own."""
    names = list(compile["signature"])
    declared = set(fn.jit_function.constexprs)
    constexprs, ones = {}, []
    for path, value in compile["constants"].items():
        if len(path) != 1:
            continue
        if path[0] in declared:
            constexprs[names[path[0]]] = _constexpr_text(value)
        else:
            ones.append(names[path[0]])
    return constexprs, sorted(ones)


def _constexpr_text(value) -> str:
    """A constexpr's value as text: a Triton dtype by its name (fp32), anything else as str()."""
    return str(getattr(value, "name", value))


def _run_forward_and_backward(
    spec, sizes: dict, param: torch.dtype, target: torch.dtype, reduction: str | None
) -> None:
    device = torch.device("cpu")
    inputs = [
        arg.make(sizes, param if arg.kind == "param" else target, device).requires_grad_(arg.differentiable)
        for arg in spec.inputs
    ]
    kwargs = spec.size_arguments(sizes)
    if reduction is not None:
        kwargs["reduction"] = reduction
    outputs = spec.fastvae(*inputs, **kwargs)
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o.requires_grad]
    leaves = [x for x in inputs if x.requires_grad]
    if outputs and leaves:
        torch.autograd.grad(outputs, leaves, [torch.ones_like(o) for o in outputs], allow_unused=True)
