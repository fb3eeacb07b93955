"""fastvae-train: train a VAE on MNIST-style images with the fused ops, then evaluate it in nats.

    fastvae-train --compile --amp                       # Fashion-MNIST, MLP VAE, 10 epochs
    fastvae-train --arch conv --latent-dim 2 --epochs 20
    torchrun --nproc-per-node 2 -m fastvae.train        # DDP (gloo on CPU, NCCL on GPU)
    fastvae-train --resume runs/20260101-120000          # continue a run where it stopped

The run folder (--out) receives config.json, metrics.jsonl, last.pt, best.pt,
test_metrics.json and the pictures; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import sys
import time

import fastvae
from fastvae.errors import BackendUnavailableError
from fastvae.train import distributed, plots
from fastvae.train.checkpoint import CheckpointError
from fastvae.train.config import parse_config, pick_device
from fastvae.train.data import DataError
from fastvae.train.inductor_cache import isolate_inductor_cache
from fastvae.train.progress import TrainProgress, summary_table
from fastvae.train.trainer import final_evaluation, fit, prepare


def run_training(argv: list[str] | None = None) -> dict:
    """Everything main() does, raising instead of exiting; returns the test results."""
    started = time.perf_counter()
    cfg = parse_config(argv)
    if cfg.compile:
        isolate_inductor_cache()
    dist = distributed.setup(pick_device(cfg.device).type)
    try:
        # auto defers to $FASTVAE_BACKEND; a named backend wins over it.
        backend = contextlib.nullcontext() if cfg.backend == "auto" else fastvae.use_backend(cfg.backend)
        with backend:
            run = prepare(cfg, dist)
            with TrainProgress(cfg.epochs, dist.is_main) as progress:
                fit(run, progress)
                test, best_model = final_evaluation(run, progress)
            wall = time.perf_counter() - started
            if dist.is_main:
                if cfg.plots:
                    images = run.data.test
                    plots.draw_all(best_model, images.images.float() / 255.0, images.labels, run.state.history,
                                   run.run_dir, cfg.seed)
                progress.console.print(summary_table(run.state.history, test, wall, str(run.run_dir)))
        return test
    finally:
        distributed.teardown(dist)


def main(argv: list[str] | None = None) -> None:
    try:
        run_training(argv)
    except (CheckpointError, DataError, BackendUnavailableError, ValueError) as error:
        sys.exit(f"fastvae-train: error: {error}")


if __name__ == "__main__":
    main()
