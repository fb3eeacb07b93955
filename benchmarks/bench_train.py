"""A whole VAE training step: fastvae-train's step against a plain PyTorch loop on the same model.

setup: the default fastvae-train model (MLP VAE, 784-512-256-32) on a batch of
binarized 28x28 images; one round = forward, backward and an Adam step.
provider:
  plain    the loop a user writes: torch.randn_like sampling, binary_cross_entropy_with_logits
           and the closed-form KL as separate ops (unfused)
  fastvae  fastvae.trainer.ELBOObjective: fused reparameterize+KL and Bernoulli log-likelihood
modes: eager or torch.compile of the step's forward (backward through AOT autograd), fp32 or
AMP (bf16 autocast on CPU, fp16 on CUDA). extra_info records samples/s; the README quotes the
fastvae / plain ratio with the machine named. Nothing here asserts a speed.

    pytest benchmarks/bench_train.py --benchmark-only          # time it
    pytest benchmarks/bench_train.py --benchmark-disable       # one step per case, a quick check
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvae.train.models import VAEConfig, build_model
from fastvae.train.trainer import ELBOObjective

BATCH_SIZE = 128  # fastvae-train's default
IMAGE_SHAPE = (1, 28, 28)  # Fashion-MNIST
WARMUP_STEPS = 3  # the first steps pay for compilation and allocator growth
MIN_ROUNDS = 20
# A step is a few ms on a CPU and shared machines are noisy: time each case this many
# times longer than an op case (--bench-seconds), so the median settles.
SECONDS_SCALE = 5.0
PROVIDERS = ("plain", "fastvae")
COMPILE = (False, True)
AMP = (False, True)


class PlainObjective(nn.Module):
    """x [B, C, H, W] -> (mean -ELBO, stats [2]) with unfused PyTorch ops, same interface as ELBOObjective."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, kl_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.model.decode(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum()
        batch = x.shape[0]
        return recon / batch + kl_weight * kl / batch, torch.stack([recon, kl]).detach()


def make_step(provider: str, compiled: bool, amp: bool, device: torch.device, quick: bool,
              optimize: bool = True):
    """A closure running one training step, as fastvae-train runs it; with optimize=False only
    its forward and backward (no Adam step), where the loss side's share is larger."""
    torch.manual_seed(0)
    model = build_model(VAEConfig(image_shape=IMAGE_SHAPE)).to(device)
    objective = ELBOObjective(model, free_bits=0.0) if provider == "fastvae" else PlainObjective(model)
    if compiled:
        # With --benchmark-disable only graph capture is checked: dynamo with the eager backend
        # proves the step compiles without a graph break, in seconds instead of inductor's minute.
        objective = torch.compile(objective, backend="eager" if quick else "inductor")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and low == torch.float16)
    x = (torch.rand(BATCH_SIZE, *IMAGE_SHAPE, device=device) < 0.5).float()
    weight = torch.tensor(1.0, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=low, enabled=amp):
            loss, _ = objective(x, weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if optimize:
            scaler.step(optimizer)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


# Order: eager cases before any torch.compile (inductor's compile workers then share the
# CPU), and within a setting the two providers back to back (the bottom decorator varies
# slowest). With the provider outermost, every fastvae case ran minutes after its plain
# case and after the compiled ones: 0.84x eager in one run where interleaved steps
# (benchmarks.train_ab) gave 1.04x.
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("amp", AMP, ids=["fp32", "amp"])
@pytest.mark.parametrize("compiled", COMPILE, ids=["eager", "compile"])
def test_train_step(benchmark, device, bench_seconds, provider, compiled, amp):
    step = make_step(provider, compiled, amp, device, quick=benchmark.disabled)
    if benchmark.disabled:
        benchmark(step)
        return
    for _ in range(WARMUP_STEPS):
        step()
    start = time.perf_counter()
    step()
    rounds = max(MIN_ROUNDS, math.ceil(SECONDS_SCALE * bench_seconds / (time.perf_counter() - start)))
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    benchmark.extra_info.update({"op": "train_step", "provider": provider, "compile": compiled, "amp": amp,
                                 "batch_size": BATCH_SIZE,
                                 "samples_per_s": BATCH_SIZE / benchmark.stats.stats.median})
