"""What every family's Triton kernels share: Philox noise, a stable log1p, the tile menu, dtypes,
and the description of each kernel specialization a launcher can request (which
tests/test_triton_compile.py compiles for real GPUs)."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from fastvae.ops.common import LIKELIHOOD_DTYPE_PAIRS, as_dtype, likelihood_inputs, loss_dtype

# A tile holds TILE_ELEMENTS elements, BLOCK_B rows of BLOCK_N columns, with BLOCK_N from
# this short menu: wide rows loop over N in steps of 1024, narrow rows share a tile so a
# latent of 32 still fills it. A fixed menu keeps the specializations few enough to
# compile every one of them for real GPUs in CI (benchmarks/triton_resources.py). With 8
# warps a thread holds 4 elements of each tensor (16-byte loads in float32): ptxas then
# fits every kernel with no spills, at most about 160 registers on sm_90 (about 210 for the
# float64 samplers), where 4096-element tiles spilled in half of them.
TILE_ELEMENTS = 1024
BLOCK_WIDTHS = (64, 1024)
# How every kernel is launched (and compiled for the resource report). Without maxnreg,
# ptxas aims 256-thread blocks at 64 registers and spilled a few bytes in the narrow row
# kernels; allowed up to 255 it uses what it needs (72 there) and spills nothing.
LAUNCH_OPTIONS = {"num_warps": 8, "maxnreg": 255}


@triton.jit
def philox_normal(seed, index, COMPUTE: tl.constexpr):
    """Standard normals for an int64 flat `index` block (any shape) from an int64 `seed` value.

    Element i is normal i % 4 of Philox4x32-10 at counter (g lo32, g hi32, 0, 0), g = i // 4,
    key (seed lo32, seed hi32), through Box-Muller on word pairs (0, 1) and (2, 3): the
    stream of fastvae.ops.noise. Each element computes its group's Philox itself; on a GPU
    that arithmetic hides under the memory traffic."""
    # Philox4x32-10's constants (fastvae.ops.noise), local: Triton compares each module-level
    # constant a kernel reads on every launch, microseconds of a launch-bound step's host time.
    mul_a: tl.constexpr = 0xD2511F53
    mul_b: tl.constexpr = 0xCD9E8D57
    key_a: tl.constexpr = 0x9E3779B9
    key_b: tl.constexpr = 0xBB67AE85
    seed = seed.to(tl.int64)
    group = index >> 2
    which = index & 3
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((group >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        prev_c0 = c0
        prev_c2 = c2
        c0 = tl.umulhi(mul_b, prev_c2) ^ c1 ^ k0
        c2 = tl.umulhi(mul_a, prev_c0) ^ c3 ^ k1
        c1 = tl.mul(mul_b, prev_c2, sanitize_overflow=False)
        c3 = tl.mul(mul_a, prev_c0, sanitize_overflow=False)
        k0 = tl.add(k0, key_a, sanitize_overflow=False)
        k1 = tl.add(k1, key_b, sanitize_overflow=False)
    # Normals 0, 1 take words (0, 1); normals 2, 3 take words (2, 3).
    first_pair = which < 2
    radius_word = tl.where(first_pair, c0, c2)
    angle_word = tl.where(first_pair, c1, c3)
    # 24 bits fill a float32 mantissa exactly; +0.5 keeps u > 0 so log(u) is finite.
    u_radius = ((radius_word >> 8).to(COMPUTE) + 0.5) * 5.9604644775390625e-08  # 2^-24
    u_angle = ((angle_word >> 8).to(COMPUTE) + 0.5) * 5.9604644775390625e-08
    theta = 6.283185307179586 * u_angle
    return tl.sqrt(-2.0 * tl.log(u_radius)) * tl.where((which & 1) == 0, tl.cos(theta), tl.sin(theta))


@triton.jit
def log1p_small(e):
    """log(1 + e) for 0 <= e <= 1, accurate when 1 + e rounds: log(u) plus the rounding error of
    u = 1 + e over u, as fastvae/ops/bernoulli/reference.py's log1p_small says why."""
    u = 1.0 + e
    return tl.log(u) + (e - (u - 1.0)) / u


def compute_dtype(*tensors: torch.Tensor | None):
    """The kernels compute in float32, or float64 when any input is float64."""
    for t in tensors:  # a loop, not any(genexpr): this runs on every launch
        if t is not None and t.dtype == torch.float64:
            return tl.float64
    return tl.float32


@functools.cache  # a few widths per model, asked on every launch
def tile(cols: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_N) for rows of `cols` elements, from the menu above."""
    block_n = next((width for width in BLOCK_WIDTHS if cols <= width), BLOCK_WIDTHS[-1])
    return TILE_ELEMENTS // block_n, block_n


def launch(kernel, rows: int, *args, **constexprs) -> None:
    """Start `kernel` over `rows` rows, constexprs["BLOCK_B"] rows per program, with LAUNCH_OPTIONS:
    how every launcher starts its kernel. On a GPU a small model's step is bound by the host, so
    this path is written for its cost per call (`python -m benchmarks.triton_launch_cost`): the
    grid is integer arithmetic (`triton.cdiv` is a constexpr function, microseconds per call)."""
    block_b = constexprs["BLOCK_B"]
    kernel[((rows + block_b - 1) // block_b,)](*args, **constexprs, **LAUNCH_OPTIONS)


def tiles() -> list[tuple[int, int]]:
    """Every (BLOCK_B, BLOCK_N) that `tile` can return."""
    return [(TILE_ELEMENTS // width, width) for width in BLOCK_WIDTHS]


# --------------------------------------------------------------------------- specializations
_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
}
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Specialization:
    """One compiled form of a kernel: pointer dtypes and constexpr values (the rest of the
    arguments are 32-bit integers, or float64 scalars where `floats` names them)."""

    kernel: Any  # a triton.JITFunction
    pointers: dict[str, torch.dtype]
    constexprs: dict[str, Any]
    floats: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        dtypes = ",".join(f"{k}={str(v).removeprefix('torch.')}" for k, v in self.pointers.items())
        flags = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in self.constexprs.items())
        return f"{self.kernel.fn.__name__}[{dtypes}|{flags}]"

    def signature(self) -> dict[str, str]:
        out = {}
        for arg in self.kernel.arg_names:
            if arg in self.constexprs:
                out[arg] = "constexpr"
            elif arg in self.pointers:
                out[arg] = _POINTER_TYPES[self.pointers[arg]]
            else:
                out[arg] = "fp64" if arg in self.floats else "i32"
        return out


def launch_logits_likelihood(
    kernel, logits: torch.Tensor, target: torch.Tensor, elementwise: bool, compute_grad: bool, weight: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a likelihood-from-logits kernel (the Bernoulli's, the continuous Bernoulli's: one
    signature, the one logits_likelihood_specializations lists) on logits [B, D] and target [T, D]
    (T dividing B) read in the dtypes of common.likelihood_inputs. Returns log p ([B, D] if
    elementwise else [B], the compute dtype) and weight * dlogp/dlogits in logits' dtype (or None)."""
    B, D = logits.shape
    (l,), x = likelihood_inputs((logits,), target)
    logp = torch.empty((B, D) if elementwise else (B,), dtype=loss_dtype(l), device=logits.device)
    dlogits = torch.empty((B, D), dtype=l.dtype, device=logits.device) if compute_grad else None
    block_b, block_d = tile(D)
    launch(
        kernel,
        B,
        l,
        x,
        logp,
        dlogits if compute_grad else logp,
        B,
        D,
        x.shape[0],
        l.stride(0),
        x.stride(0),
        float(weight),
        ELEMENTWISE=elementwise,
        COMPUTE_GRAD=compute_grad,
        COMPUTE=compute_dtype(l),
        BLOCK_B=block_b,
        BLOCK_D=block_d,
    )
    return logp, as_dtype(dlogits, logits.dtype)


def logits_likelihood_specializations(kernel) -> list[Specialization]:
    """Every compiled form of a likelihood-from-logits kernel (the Bernoulli's, the continuous
    Bernoulli's): pointers logits_ptr, target_ptr (a pair of LIKELIHOOD_DTYPE_PAIRS), logp_ptr
    (the compute dtype) and dlogits_ptr (the logits' dtype, or logp's when unused), the float
    `weight`, and constexprs ELEMENTWISE, COMPUTE_GRAD, COMPUTE, BLOCK_B and BLOCK_D."""
    out = []
    for (logits, target), (block_b, block_d) in itertools.product(LIKELIHOOD_DTYPE_PAIRS, tiles()):
        loss = torch.float64 if logits == torch.float64 else torch.float32
        for elementwise, grad in itertools.product((False, True), repeat=2):
            pointers = {
                "logits_ptr": logits,
                "target_ptr": target,
                "logp_ptr": loss,
                "dlogits_ptr": logits if grad else loss,
            }
            out.append(
                Specialization(
                    kernel,
                    pointers,
                    {
                        "ELEMENTWISE": elementwise,
                        "COMPUTE_GRAD": grad,
                        "COMPUTE": compute_dtype(torch.empty(0, dtype=logits)),
                        "BLOCK_B": block_b,
                        "BLOCK_D": block_d,
                    },
                    floats=("weight",),
                )
            )
    return out
