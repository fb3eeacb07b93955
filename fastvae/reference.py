"""Pure-PyTorch implementation of every fastvae op: the `torch` backend.

It is always available, runs on any device, and is the readable statement of
what the Triton and native kernels compute. Every function here takes 2-D row
views `[B, N]` (dim 0 is the batch) and follows the backend contract that
`fastvae.backend` documents. Math runs in float32 (float64 for float64 inputs);
losses come back in float32 (float64 for float64 inputs), gradients in each
input's dtype.

Formulas (see DESIGN.md):
    z   = mu + exp(0.5 * logvar) * eps
    kl  = 0.5 * (mu^2 + exp(logvar) - logvar - 1)        per element
    logp = x * l - softplus(l) = -(max(l, 0) - l * x + log1p(exp(-|l|)))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ---------------------------------------------------------------------------
# Counter-based noise: Philox4x32-10 (Salmon et al., SC'11), four normals per
# counter. Every backend implements exactly this stream, so one seed gives the
# same eps (to the last few ulps of log/sin/cos) on torch, triton and native.
#   key     = (seed & 0xffffffff, seed >> 32)
#   counter = (g & 0xffffffff, g >> 32, 0, 0) for the group g = i // 4 of the
#             flat index i = b * L + j
#   u_k     = ((c_k >> 8) + 0.5) / 2^24 in (0, 1) for the four words c0..c3
#   r0, r1  = sqrt(-2 ln u0), sqrt(-2 ln u2)                          (Box-Muller)
#   eps[4g], eps[4g+1], eps[4g+2], eps[4g+3]
#           = r0 cos(2 pi u1), r0 sin(2 pi u1), r1 cos(2 pi u3), r1 sin(2 pi u3)
# Using all four words and both Box-Muller outputs costs one Philox call and two
# logs per four normals; one normal per call made the noise most of the CPU
# kernel's time.
# ---------------------------------------------------------------------------
PHILOX_MUL_A = 0xD2511F53
PHILOX_MUL_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
SEED_HIGH = 2**62  # seeds are drawn in [0, 2^62): a non-negative int64 on every backend
_U32 = 0xFFFFFFFF


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


def philox_uint32x4(seed: int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four 32-bit words of Philox4x32-10 at int64 `counter` [N]."""
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


def philox_normal(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> Tensor:
    """Standard-normal noise of `shape` from `seed`: element i (row-major) is normal i % 4
    of Philox counter i // 4, as the stream above says."""
    numel = math.prod(shape)
    counter = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u0, u1, u2, u3 = (((c >> 8).to(compute) + 0.5) * 2.0**-24 for c in philox_uint32x4(seed, counter))
    r0, r1 = torch.sqrt(-2.0 * torch.log(u0)), torch.sqrt(-2.0 * torch.log(u2))
    theta1, theta3 = (2.0 * math.pi) * u1, (2.0 * math.pi) * u3
    groups = torch.stack([r0 * torch.cos(theta1), r0 * torch.sin(theta1),
                          r1 * torch.cos(theta3), r1 * torch.sin(theta3)], dim=1)  # [G, 4]
    return groups.reshape(-1)[:numel].reshape(shape).to(dtype)


# ---------------------------------------------------------------------------
# Backend contract: see fastvae.backend for the full statement.
# ---------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _noise(mu: Tensor, eps: Tensor | None, seed: int, compute: torch.dtype) -> Tensor:
    if eps is not None:
        return eps.to(compute)
    return philox_normal(seed, tuple(mu.shape), compute, mu.device)


def reparameterize_kl_forward(mu: Tensor, logvar: Tensor, eps: Tensor | None,
                              seed: int) -> tuple[Tensor, Tensor]:
    """mu, logvar, eps: [B, L] -> z [B, L] (mu's dtype), kl [B] (float32)."""
    compute = _compute_dtype(mu, logvar)
    m, lv = mu.to(compute), logvar.to(compute)
    z = m + torch.exp(0.5 * lv) * _noise(mu, eps, seed, compute)
    kl = 0.5 * (m * m + torch.exp(lv) - lv - 1.0)
    return z.to(mu.dtype), kl.sum(dim=1).to(compute)


def reparameterize_kl_backward(grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor,
                               logvar: Tensor, eps: Tensor | None,
                               seed: int) -> tuple[Tensor, Tensor]:
    """grad_z [B, L] or None, grad_kl [B] or None -> grad_mu, grad_logvar [B, L].

    dz/dmu = 1, dz/dlogvar = 0.5 * std * eps; dkl/dmu = mu, dkl/dlogvar = 0.5 * (exp(logvar) - 1)."""
    compute = _compute_dtype(mu, logvar)
    m, lv = mu.to(compute), logvar.to(compute)
    grad_mu = torch.zeros_like(m)
    grad_logvar = torch.zeros_like(lv)
    if grad_z is not None:
        g = grad_z.to(compute)
        grad_mu = grad_mu + g
        grad_logvar = grad_logvar + g * 0.5 * torch.exp(0.5 * lv) * _noise(mu, eps, seed, compute)
    if grad_kl is not None:
        g = grad_kl.to(compute)[:, None]
        grad_mu = grad_mu + g * m
        grad_logvar = grad_logvar + g * 0.5 * torch.expm1(lv)
    return grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype)


def gaussian_kl_forward(mu: Tensor, logvar: Tensor, elementwise: bool,
                        compute_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """mu, logvar [B, L] -> kl ([B, L] if elementwise else [B]), dkl/dmu, dkl/dlogvar (or None)."""
    compute = _compute_dtype(mu, logvar)
    m, lv = mu.to(compute), logvar.to(compute)
    kl = 0.5 * (m * m + torch.exp(lv) - lv - 1.0)
    kl = (kl if elementwise else kl.sum(dim=1)).to(compute)
    if not compute_grad:
        return kl, None, None
    return kl, mu.clone(), (0.5 * torch.expm1(lv)).to(logvar.dtype)


def bernoulli_log_likelihood_forward(logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool,
                                     grad_scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """logits, target [B, D] -> log p ([B, D] if elementwise else [B]), grad_scale * dlogp/dlogits (or None).

    log p = x*l - softplus(l), written so that no exp overflows; dlogp/dl = x - sigmoid(l)."""
    compute = _compute_dtype(logits, target)
    l, x = logits.to(compute), target.to(compute)
    logp = l * x - torch.clamp_min(l, 0.0) - torch.log1p(torch.exp(-l.abs()))
    logp = (logp if elementwise else logp.sum(dim=1)).to(compute)
    if not compute_grad:
        return logp, None
    return logp, (grad_scale * (x - torch.sigmoid(l))).to(logits.dtype)

