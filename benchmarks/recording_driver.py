"""A stand-in for Triton's CUDA driver on a machine without a GPU: the GPU launch path, minus the GPU.

With it active, a launcher's `kernel[grid](...)` goes through Triton's real dispatch for NVIDIA
targets (`JITFunction.run`: argument binding and specialization, the kernel cache, compiling
for sm_90 with the ptxas in the triton wheel, the launch metadata), and only the last step
differs: the driver neither loads the cubin nor starts it. Tensors are CPU tensors (Triton
reads their data pointers and dtypes, never their data). What the module records is which
specializations the launchers ask for (launched_specializations).

Two uses, both where no GPU is:
  - the host time of fastvae's Triton launchers and of Triton's dispatch beneath them
    (benchmarks/triton_launch_cost.py): on a GPU a small VAE's step is bound by that time;
  - which specializations the launchers really request (tests/test_triton_compile.py checks
    that each is one the kernels' `specializations()` list, which CI compiles for real GPUs).

Needs a process where TRITON_INTERPRET is unset: under the interpreter `triton.jit` makes no
compilable kernel. The memory stands in for an H100/H200 (sm_90).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TARGET_ARCH = 90
SHARED_MEMORY_BYTES = 232448  # per block on sm_90, what an H100/H200 reports
MAX_THREADS_PER_BLOCK = 1024


class RecordingDriver:
    """Triton's driver interface as JITFunction.run and CompiledKernel use it, for one sm_90 device
    that loads nothing and launches nothing."""

    def __init__(self) -> None:
        self.utils = _Utils()
        self.launcher_cls = _Launcher

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", TARGET_ARCH, 32)

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return divmod(TARGET_ARCH, 10)

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

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_MEMORY_BYTES, "multiprocessor_count": 132, "warpSize": 32}


@contextlib.contextmanager
def recording_driver() -> Iterator[RecordingDriver]:
    """Make a RecordingDriver Triton's active driver for the block (and the previous one after it).
    Run it in a process of its own: the kernels it compiles stay in their JITFunction's caches."""
    import os

    from triton.runtime.driver import driver as active

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the recording driver needs real Triton kernels: unset TRITON_INTERPRET")
    if torch.cuda.is_available():
        # Its placeholder handles would stay in the kernels' caches and reach the real GPU.
        raise RuntimeError("the recording driver stands in for a GPU where there is none; this machine has one")
    previous = active._active
    recorder = RecordingDriver()
    active.set_active(recorder)
    try:
        yield recorder
    finally:
        active._active = previous


# Sizes for launched_specializations: each axis small, but the data wider than the narrow tile.
_SIZES = {"batch": 4, "data": 100, "latent": 3, "samples": 2}


def launched_specializations() -> list[dict]:
    """Every kernel specialization fastvae's Triton launchers request when each public op (the
    registry's specs, every reduction) runs forward and backward with every storage dtype pair
    (LIKELIHOOD_DTYPE_PAIRS: param, target), on CPU tensors through the recording driver. Nothing
    is compiled (Triton's jit_cache_hook declines each compile) and no value is read: value checks
    are off. Each entry: {"kernel", "pointers": {name: type}, "constexprs": {name: repr}}."""
    import triton

    import fastvae
    from fastvae import backend, validation
    from fastvae.ops.common import LIKELIHOOD_DTYPE_PAIRS
    from fastvae.ops.registry import op_specs

    requested: dict[str, dict] = {}

    def record(*, fn, compile, **_) -> bool:
        signature = compile["signature"]  # parameter name -> type ("*fp32", "i32", "constexpr", ...)
        names = list(signature)
        pointers = {name: kind for name, kind in signature.items() if kind.startswith("*")}
        # constants: (parameter index,) -> value, for the declared constexprs and for the ints
        # Triton specializes as constants (a value of 1): only the declared ones name a specialization.
        declared = set(fn.jit_function.constexprs)
        constexprs = {
            names[path[0]]: _constexpr_text(value)
            for path, value in compile["constants"].items()
            if len(path) == 1 and path[0] in declared
        }
        entry = {"kernel": fn.name, "pointers": pointers, "constexprs": constexprs}
        requested[repr(entry)] = entry
        return True  # declined: no compile, no launch

    previous_hook, previous_reason = triton.knobs.runtime.jit_cache_hook, backend._triton_reason
    previous_validation = validation.validate_args_enabled()
    triton.knobs.runtime.jit_cache_hook = record
    backend._triton_reason = lambda device: None  # the triton backend on CPU tensors, interpreter unset
    fastvae.set_validate_args(False)  # the outputs are never written: nothing may read them
    try:
        with recording_driver(), fastvae.use_backend("triton"):
            for spec in op_specs():
                for param, target in LIKELIHOOD_DTYPE_PAIRS:
                    for reduction in spec.reductions or (None,):
                        _run_forward_and_backward(spec, param, target, reduction)
    finally:
        triton.knobs.runtime.jit_cache_hook = previous_hook
        backend._triton_reason = previous_reason
        fastvae.set_validate_args(previous_validation)
    return list(requested.values())


def _constexpr_text(value) -> str:
    """A constexpr's value as text: a Triton dtype by its name (fp32), anything else as str()."""
    return str(getattr(value, "name", value))


def _run_forward_and_backward(spec, param: torch.dtype, target: torch.dtype, reduction: str | None) -> None:
    device = torch.device("cpu")
    inputs = [
        arg.make(_SIZES, param if arg.kind == "param" else target, device).requires_grad_(arg.differentiable)
        for arg in spec.inputs
    ]
    kwargs = spec.size_arguments(_SIZES)
    if reduction is not None:
        kwargs["reduction"] = reduction
    outputs = spec.fastvae(*inputs, **kwargs)
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o.requires_grad]
    leaves = [x for x in inputs if x.requires_grad]
    if outputs and leaves:
        torch.autograd.grad(outputs, leaves, [torch.ones_like(o) for o in outputs], allow_unused=True)
