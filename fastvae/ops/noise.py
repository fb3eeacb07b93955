"""The in-kernel noise: one Philox stream that every backend draws, and where its seeds come from.

Counter-based noise, Philox4x32-10 (Salmon et al., SC'11), four normals per counter.
One seed gives the same eps on torch, triton and native (to the last few ulps of
log/sin/cos):

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (g & 0xffffffff, g >> 32, 0, 0) for the group g = i // 4 of the flat
              index i = row * L + j of a [rows, L] draw
    u_k     = ((c_k >> 8) + 0.5) / 2^24 in (0, 1) for the four words c0..c3
    r0, r1  = sqrt(-2 ln u0), sqrt(-2 ln u2)                           (Box-Muller)
    eps[4g], eps[4g+1], eps[4g+2], eps[4g+3]
            = r0 cos(2 pi u1), r0 sin(2 pi u1), r1 cos(2 pi u3), r1 sin(2 pi u3)

All four words and both Box-Muller outputs are used: one Philox call and two logs
per four normals.

Seeds are 0-d int64 tensors in [0, 2^62) on the device of the op's tensors, drawn
from torch's generator of that device, so `torch.manual_seed` reproduces a run. On
CUDA the seed never visits the host: the kernel reads it through a pointer, and
torch's CUDA generator registers the draw with a CUDA graph being captured, so each
replay draws a fresh seed (a host-side seed would be baked into the graph and every
replay would repeat the same noise).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PHILOX_MUL_A = 0xD2511F53
PHILOX_MUL_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
SEED_HIGH = 2**62  # seeds are drawn in [0, 2^62): a non-negative int64 on every backend
_U32 = 0xFFFFFFFF


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """A fresh seed: a 0-d int64 tensor on `device`, from `generator` or torch's default one there.

    A generator on another device than the tensors draws there and the seed is copied
    over (eager only: the copy is not capture-safe under CUDA graphs)."""
    if generator is not None and generator.device != device:
        seed = torch.randint(0, SEED_HIGH, (), dtype=torch.int64, generator=generator, device=generator.device)
        return seed.to(device)
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, generator=generator, device=device)


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of a * b for uint32 values held in int64 tensors.

    The full product needs 64 unsigned bits, more than int64 holds, so it is
    built from 16-bit halves whose partial products all fit."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    middle = a_hi * b_lo + a_lo * b_hi
    hi = a_hi * b_hi + ((middle + (low >> 16)) >> 16)
    lo = ((middle << 16) + low) & _U32
    return hi, lo


def philox_uint32x4(seed: int | Tensor, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four 32-bit words (in int64 tensors) of Philox4x32-10 at int64 `counter` [N].

    `seed` is an int or a 0-d int64 tensor on counter's device (no host sync)."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(PHILOX_ROUNDS):
        hi_a, lo_a = _mulhilo32(PHILOX_MUL_A, c0)
        hi_b, lo_b = _mulhilo32(PHILOX_MUL_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _U32, (k1 + PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def philox_normal(
    seed: int | Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Tensor:
    """Standard-normal noise of `shape` from `seed`: element i (row-major) is normal i % 4
    of Philox counter i // 4, as the stream above says. Computed in float64 for float64,
    else in float32."""
    numel = math.prod(shape)
    counter = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u0, u1, u2, u3 = (((c >> 8).to(compute) + 0.5) * 2.0**-24 for c in philox_uint32x4(seed, counter))
    r0, r1 = torch.sqrt(-2.0 * torch.log(u0)), torch.sqrt(-2.0 * torch.log(u2))
    theta1, theta3 = (2.0 * math.pi) * u1, (2.0 * math.pi) * u3
    groups = torch.stack(
        [r0 * torch.cos(theta1), r0 * torch.sin(theta1), r1 * torch.cos(theta3), r1 * torch.sin(theta3)], dim=1
    )  # [G, 4]
    return groups.reshape(-1)[:numel].reshape(shape).to(dtype)
