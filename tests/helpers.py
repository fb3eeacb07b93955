"""Shared test tables: backends, dtypes, tolerances, and the comparison against a float64 oracle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from fastvae.backend import BACKENDS as BACKEND_NAMES
from fastvae.backend import unavailable_reason
from fastvae.ops import library
from fastvae.ops.noise import draw_seed, philox_normal

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_params() -> list:
    """Every backend, skipped (with the reason) where it cannot run on DEVICE."""
    params = []
    for name in BACKEND_NAMES:
        reason = unavailable_reason(name, DEVICE)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


BACKENDS = backend_params()

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Tolerance by the dtype of the tensor being checked: losses are float32 whatever the inputs,
# z and gradients carry their input's dtype (one rounding of the output).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_close_to(actual: Tensor, expected: Tensor, name: str, min_tolerance: float = 0.0) -> None:
    """actual vs the float64 oracle, relative to the oracle's scale: |a - e| <= tol * (|e| + max|e|/10),
    tol by actual's dtype (TOLERANCE), at least min_tolerance (an op whose math amplifies rounding).

    Plus a few subnormal steps of actual's dtype: a "mean" over thousands of elements gives
    fp16 gradients below its smallest normal number. NaN must stand where the oracle's NaN
    stands, and nowhere else."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    dtype = actual.dtype
    tol, finfo = max(TOLERANCE[dtype], min_tolerance), torch.finfo(dtype)
    expected, actual = expected.detach().double(), actual.detach().double()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{name}: NaN where the oracle has none, or the other way"
    actual, expected = actual[~nan], expected[~nan]
    if not expected.numel():
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = ((actual - expected).abs() - 4 * finfo.smallest_normal * finfo.eps).clamp_min(0.0)
    scale = expected.abs() + expected.abs().max().clamp_min(1e-30) / 10
    worst = (err / scale).max().item()
    assert worst <= tol, f"{name}: relative error {worst:.3g} > {tol:.3g} ({dtype})"


def leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def oracle_noise(spec, sizes: dict, seed: int, device: torch.device) -> Tensor:
    """The float64 noise an op spec's oracle takes as eps: what a generator seeded with `seed` (or
    torch.manual_seed(seed)'s default one) makes the op draw at `sizes`."""
    drawn = draw_seed(device, torch.Generator(device).manual_seed(seed))
    return philox_normal(drawn, spec.noise_shape(sizes), torch.float64, device)


def oracle_outputs_and_grads(spec, inputs: list, kwargs: dict, upstream: list) -> tuple[tuple, tuple]:
    """An op spec's float64 oracle on `inputs`: its outputs, and the gradient of each differentiable
    input for the upstream gradients `upstream`."""
    leaves = [x.detach().double().requires_grad_(arg.differentiable) for arg, x in zip(spec.inputs, inputs)]
    outputs = spec.oracle(*leaves, **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs, [x for x in leaves if x.requires_grad], [u.double() for u in upstream])
    return outputs, grads


class RecordPointwiseSizes(TorchDispatchMode):
    """Records the numel of every pointwise aten op's output run under it in `sizes`: a
    backward that hands a saved gradient over must show no op the size of [B, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.Tag.pointwise in func.tags:
            self.sizes.append(out.numel())
        return out


def compiled_forward_targets(fn, *args) -> list[str]:
    """The call targets of the forward graph that a compiler backend receives for fn(*args)
    (fullgraph): after AOTAutograd, where each in-graph op has become its composite's torch ops
    or the custom op's node."""
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    seen = []

    def forward_compiler(graph, example_inputs):
        seen.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph

    torch.compile(fn, backend=aot_autograd(fw_compiler=forward_compiler), fullgraph=True)(*args)
    assert not any("_in_graph" in target for target in seen), f"an in-graph op reached the compiler: {seen}"
    return seen


needs_library = pytest.mark.skipif(
    library.load_error() is not None, reason=f"native library not built: {library.load_error()}"
)

# The recording driver (benchmarks/recording_driver.py) stands in for a GPU where there is none,
# and refuses where there is one: its tests run only without CUDA.
without_a_gpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the recording driver stands in for a GPU where there is none"
)


def run_without_interpreter(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`python *args` from the repository root in a process with TRITON_INTERPRET unset (the
    tests set it; the recording driver needs Triton's compilable kernels), its output captured.
    Fails the calling test, with the process's stderr, when the process fails."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, *args], env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
