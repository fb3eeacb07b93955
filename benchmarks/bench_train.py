"""A whole VAE training step: fastvae-train's step against a plain PyTorch loop on the same model.

setup: the default fastvae-train model (MLP VAE, 784-512-256-32) on a batch of binarized 28x28
images; one round = forward, backward and an Adam step.
provider:
  plain    the loop a user writes: torch.randn_like sampling, binary_cross_entropy_with_logits
           and the closed-form KL as separate ops (unfused)
  fastvae  fastvae.train.trainer.ELBOObjective: the fused reparameterize_kl and elbo_loss
modes: eager, torch.compile of the step's forward (backward through AOT autograd), and on CUDA
compile with mode="reduce-overhead" (CUDA graphs); fp32 or AMP (bf16 autocast); batch 128 (and
1024 with --sweep or --gpu-run). extra_info records samples/s; nothing
here asserts a speed. `python -m benchmarks.train_ab` measures the same steps interleaved.

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

import fastvae
from fastvae.train.models import VAEConfig, build_model
from fastvae.train.trainer import ELBOObjective

BATCH_SIZE = 128  # fastvae-train's default
LARGE_BATCH_SIZE = 1024
IMAGE_SHAPE = (1, 28, 28)  # Fashion-MNIST
WARMUP_STEPS = 3  # the first steps pay for compilation and allocator growth
MIN_ROUNDS = 20
# A step is a few ms on a CPU and shared machines are noisy: time each case this many
# times longer than an op case (--bench-seconds), so the median settles.
SECONDS_SCALE = 5.0
PROVIDERS = ("plain", "fastvae")
COMPILE_MODES = ("eager", "default", "reduce-overhead")  # eager: no torch.compile


class PlainObjective(nn.Module):
    """x [B, C, H, W] -> (mean -ELBO, stats [3]) with unfused PyTorch ops, same interface as ELBOObjective."""

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
        return recon / batch + kl_weight * kl / batch, torch.stack([recon + kl, recon, kl]).detach()


def make_parts(
    provider: str, compile_mode: str, device: torch.device, quick: bool = False, batch_size: int = BATCH_SIZE
):
    """What one training step uses, as fastvae-train builds it: (objective, optimizer, x, kl_weight),
    the objective compiled unless compile_mode is "eager"."""
    torch.manual_seed(0)
    model = build_model(VAEConfig(image_shape=IMAGE_SHAPE)).to(device)
    objective = ELBOObjective(model, free_bits=0.0) if provider == "fastvae" else PlainObjective(model)
    if compile_mode != "eager":
        # With --benchmark-disable only graph capture is checked: dynamo with the eager backend
        # proves the step compiles without a graph break, in seconds instead of inductor's minute.
        # Both objectives get fastvae-train's options (fastvae.compile_options: no guards on
        # fastvae's own code, which plain's objective does not read).
        objective = (
            torch.compile(objective, backend="eager", options=fastvae.compile_options())
            if quick
            else torch.compile(objective, options=fastvae.compile_options(compile_mode))
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = (torch.rand(batch_size, *IMAGE_SHAPE, device=device) < 0.5).float()
    return objective, optimizer, x, torch.tensor(1.0, device=device)


def make_step(
    provider: str,
    compile_mode: str,
    amp: bool,
    device: torch.device,
    quick: bool = False,
    optimize: bool = True,
    batch_size: int = BATCH_SIZE,
):
    """A closure running one training step as fastvae-train runs it; with optimize=False only its
    forward and backward (no Adam step), where the loss side's share is larger."""
    objective, optimizer, x, weight = make_parts(provider, compile_mode, device, quick, batch_size)
    low = torch.bfloat16  # AMP is bf16 autocast on both devices: no GradScaler in the timed step

    def step() -> None:
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: outputs may be overwritten
        with torch.autocast(device.type, dtype=low, enabled=amp):
            loss, _ = objective(x, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimize:
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def settings(device: torch.device, selection: str) -> list[tuple[str, bool, int]]:
    """(compile mode, amp, batch size) of every case: reduce-overhead only on CUDA (it is CUDA
    graphs), batch 1024 beside 128 outside the default selection."""
    modes = COMPILE_MODES if device.type == "cuda" else COMPILE_MODES[:2]
    batches = (BATCH_SIZE,) if selection == "default" else (BATCH_SIZE, LARGE_BATCH_SIZE)
    return [(mode, amp, batch) for batch in batches for mode in modes for amp in (False, True)]


def pytest_generate_tests(metafunc):
    """Order: eager cases before any torch.compile (inductor's compile workers then share the CPU),
    and within a setting the two providers back to back, so drift between cases minutes apart
    cannot bias a ratio."""
    if "train_setting" not in metafunc.fixturenames:
        return
    from benchmarks.conftest import bench_device, selection

    device = bench_device(metafunc.config)
    params = [
        pytest.param((mode, amp, batch, provider), id=f"{mode}-{'amp' if amp else 'fp32'}-B{batch}-{provider}")
        for mode, amp, batch in settings(device, selection(metafunc.config))
        for provider in PROVIDERS
    ]
    metafunc.parametrize("train_setting", params)


def test_train_step(benchmark, device, bench_seconds, train_setting):
    compile_mode, amp, batch_size, provider = train_setting
    step = make_step(provider, compile_mode, amp, device, quick=benchmark.disabled, batch_size=batch_size)
    if benchmark.disabled:
        benchmark(step)
        return
    for _ in range(WARMUP_STEPS):
        step()
    start = time.perf_counter()
    step()
    rounds = max(MIN_ROUNDS, math.ceil(SECONDS_SCALE * bench_seconds / (time.perf_counter() - start)))
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    benchmark.extra_info.update(
        {
            "op": "train_step",
            "provider": provider,
            "compile": compile_mode,
            "amp": amp,
            "batch_size": batch_size,
            "samples_per_s": batch_size / benchmark.stats.stats.median,
        }
    )
