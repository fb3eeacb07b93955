"""What only a CUDA device can show: noise under CUDA graphs, torch.compile's reduce-overhead mode,
and the Triton kernels against the reference on the GPU. Skipped without CUDA (CI has none;
the prepared GPU run, benchmarks/gpu/run.sh, runs them)."""

from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae.ops.gaussian.op import reparameterize_kl_fused

from helpers import compiled_forward_targets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = torch.device("cuda")


def _model():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(20, 8).to(DEVICE)
    decoder = torch.nn.Linear(4, 20).to(DEVICE)
    return encoder, decoder


def _loss(encoder, decoder, x):
    """A VAE's loss side; returns the loss, z and the seed the sampler drew (to replay it eagerly)."""
    mu, logvar = encoder(x).chunk(2, dim=1)
    z, kl, seed = reparameterize_kl_fused(mu, logvar, None, None, None)
    return fastvae.elbo_loss(decoder(z), x, kl=kl), z, seed


def test_seeds_stay_on_the_device():
    mu = torch.randn(4, 3, device=DEVICE)
    z, kl, seed = reparameterize_kl_fused(mu, mu, None, None, None)
    assert seed.device.type == "cuda" and seed.dtype == torch.int64 and seed.dim() == 0


def test_cuda_graph_replays_draw_fresh_noise_and_the_gradients_of_eager():
    encoder, decoder = _model()
    params = list(encoder.parameters()) + list(decoder.parameters())
    x = (torch.rand(16, 20, device=DEVICE) < 0.5).float()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graphs asks
        for _ in range(3):
            loss, _, _ = _loss(encoder, decoder, x)
            torch.autograd.grad(loss, params)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, z, seed = _loss(encoder, decoder, x)
        grads = torch.autograd.grad(loss, params)
    replays = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((z.clone(), seed.clone(), [g.clone() for g in grads]))
    assert len({int(s) for _, s, _ in replays}) == 3, "every replay must draw a new seed"
    assert not torch.equal(replays[0][0], replays[1][0]), "two replays drew the same noise"
    for z_replay, seed_replay, grads_replay in replays:
        mu, logvar = encoder(x).chunk(2, dim=1)
        z_eager, kl, _ = reparameterize_kl_fused(mu, logvar, None, seed_replay, None)
        eager = torch.autograd.grad(fastvae.elbo_loss(decoder(z_eager), x, kl=kl), params)
        torch.testing.assert_close(z_replay, z_eager)
        for got, want in zip(grads_replay, eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compile_reduce_overhead_keeps_cuda_graphs_and_fresh_noise():
    from torch._dynamo.utils import counters

    encoder, decoder = _model()
    x = (torch.rand(16, 20, device=DEVICE) < 0.5).float()
    counters.clear()
    step = torch.compile(lambda x: _loss(encoder, decoder, x)[1], mode="reduce-overhead", fullgraph=True)
    draws = [step(x).clone() for _ in range(5)]
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    assert not torch.equal(draws[-1], draws[-2]), "replayed CUDA graphs repeated the noise"


def test_compiled_cuda_graphs_can_hold_the_composite(monkeypatch):
    """COMPILED_CUDA_COMPOSITE_MAX_ELEMENTS (None, never, by default) lowers a compiled CUDA call to
    the op's composite, as compiled CPU graphs do for small calls: the graph then holds no fastvae
    node, inductor compiles the composite for the GPU, and with eager's random numbers
    (fallback_random) the loss and gradients are eager's. What the prepared run's composite train
    A/B and launch_overhead.py measure must run correctly first."""
    from torch._inductor import config as inductor_config

    from fastvae.ops import common

    encoder, decoder = _model()
    params = list(encoder.parameters()) + list(decoder.parameters())
    x = (torch.rand(16, 20, device=DEVICE) < 0.5).float()

    def loss_of(x):
        mu, logvar = encoder(x).chunk(2, dim=1)
        z, kl = fastvae.reparameterize_kl(mu, logvar)
        return fastvae.elbo_loss(decoder(z), x, kl=kl) + fastvae.gaussian_kl(mu, logvar)

    assert any("fastvae." in t for t in compiled_forward_targets(loss_of, x)), "by default the nodes stay"
    monkeypatch.setattr(common, "COMPILED_CUDA_COMPOSITE_MAX_ELEMENTS", 1 << 30)
    targets = compiled_forward_targets(loss_of, x)
    assert not any("fastvae." in t for t in targets), targets
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        results = []
        for fn in (loss_of, torch.compile(loss_of, fullgraph=True)):
            torch.manual_seed(11)
            loss = fn(x)
            results.append((loss, *torch.autograd.grad(loss, params)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_on_the_gpu_matches_the_reference(dtype):
    logits = (torch.randn(257, 1100, device=DEVICE) * 3).to(dtype).requires_grad_()
    target = torch.rand(257, 1100, device=DEVICE)
    mu, logvar = (torch.randn(257, 33, device=DEVICE).to(dtype).requires_grad_() for _ in range(2))
    seed = torch.tensor(77, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        with fastvae.use_backend(backend):
            z, kl, _ = reparameterize_kl_fused(mu, logvar, None, seed, None)
            loss = fastvae.elbo_loss(logits, target, kl=kl) + z.float().square().mean()
            results[backend] = (loss, z, *torch.autograd.grad(loss, (logits, mu, logvar)))
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def _tiny_run_args(tmp_path, *extra):
    from app_helpers import tiny_args, tiny_dataset

    return tiny_args(tiny_dataset(tmp_path / "data"), tmp_path / "run", "--device", "cuda", "--epochs", "1", *extra)


def test_fp16_autocast_with_a_grad_scaler_trains(tmp_path):
    from fastvae.train.cli import run_training

    test = run_training(_tiny_run_args(tmp_path, "--amp", "--amp-dtype", "fp16"))
    assert all(value == value for key, value in test.items() if key.startswith("test_") and isinstance(value, float))


def test_reduce_overhead_training_runs_on_cuda_graphs(tmp_path):
    """fastvae-train --compile --compile-mode reduce-overhead: the step replays CUDA graphs (each
    step begins a new one) and trains to finite test metrics."""
    from fastvae.train.cli import run_training

    test = run_training(_tiny_run_args(tmp_path, "--compile", "--compile-mode", "reduce-overhead", "--amp"))
    values = [value for key, value in test.items() if key.startswith("test_") and isinstance(value, float)]
    assert values and all(value == value and abs(value) != float("inf") for value in values)


def test_one_process_nccl_ddp_run(tmp_path):
    """torchrun with one process takes the process group and DDP path, NCCL on the GPU."""
    import json
    import os
    import subprocess
    import sys

    args = _tiny_run_args(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "fastvae.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["distributed_backend"] == "nccl" and config["world_size"] == 1
    assert (tmp_path / "run" / "test_metrics.json").is_file()
