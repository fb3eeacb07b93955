"""fastvae-train: train a VAE on MNIST-style images with the fused ops, then evaluate it in nats.

    fastvae-train --compile --amp                       # Fashion-MNIST, MLP VAE, 10 epochs
    fastvae-train --compile --compile-mode reduce-overhead --amp   # on a GPU: CUDA graphs
    fastvae-train --arch conv --latent-dim 2 --epochs 20
    torchrun --nproc-per-node 2 -m fastvae.train        # DDP (gloo on CPU, NCCL on GPU)
    fastvae-train --resume runs/20260101-120000          # continue a run where it stopped

The run folder (--out) receives config.json, metrics.jsonl, last.pt, best.pt,
test_metrics.json and the pictures; only rank 0 writes, and one process at a time.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from fastvae.backend import process_backend
from fastvae.errors import BackendUnavailableError
from fastvae.train import distributed, plots
from fastvae.train.checkpoint import LAST, checkpoint_path
from fastvae.train.config import parse_config, pick_device
from fastvae.train.data import CLASS_NAMES, DataError, to_unit
from fastvae.train.inductor_cache import isolate_inductor_cache
from fastvae.train.progress import TrainProgress, summary_table
from fastvae.train.run_folder import RunFolderError
from fastvae.train.trainer import TrainingDiverged, final_evaluation, fit, prepare

EXIT_INTERRUPTED = 130  # what shells report for a process ended by Ctrl-C (128 + SIGINT)


class TrainingInterrupted(Exception):
    """Ctrl-C: the message says whether and how the run can be continued (empty on ranks other than 0)."""


def run_training(argv: list[str] | None = None) -> dict:
    """Everything main() does, raising instead of exiting; returns the test results."""
    started = time.perf_counter()
    dist, run = distributed.DistInfo(), None
    try:
        cfg = parse_config(argv)
        if cfg.compile:
            isolate_inductor_cache()
        dist = distributed.setup(pick_device(cfg.device).type)
        # auto defers to $FASTVAE_BACKEND; a named backend wins over it, for every thread (a CUDA
        # backward runs on autograd's own, and --compile's graphs choose when they run).
        backend = contextlib.nullcontext() if cfg.backend == "auto" else process_backend(cfg.backend)
        with backend, contextlib.ExitStack() as run_resources:
            run = prepare(cfg, dist, run_resources)
            with TrainProgress(cfg.epochs, dist.is_main) as progress:
                fit(run, progress)
                test, best_model = final_evaluation(run, progress)
            wall = time.perf_counter() - started
            if dist.is_main:
                if cfg.plots:
                    plots.draw_all(
                        best_model,
                        to_unit(run.data.test.images),
                        run.data.test.labels,
                        run.state.history,
                        run.run_dir,
                        cfg.seed,
                        class_names=CLASS_NAMES.get(cfg.dataset),
                        latent_frames=run.state.latent_frames,
                    )
                progress.console.print(summary_table(run.state.history, test, wall, str(run.run_dir)))
        return test
    except KeyboardInterrupt:
        message = _interrupted_message(run.run_dir if run else None) if dist.is_main else ""
        raise TrainingInterrupted(message) from None
    finally:
        run = None  # the DDP module in it holds the process group, which teardown destroys
        distributed.teardown(dist)


def _interrupted_message(run_dir: Path | None) -> str:
    if run_dir is not None and checkpoint_path(run_dir, LAST).is_file():
        return f"interrupted; the run can be resumed with: fastvae-train --resume {run_dir}"
    return "interrupted before the first checkpoint was written; there is nothing to resume"


def main(argv: list[str] | None = None) -> None:
    # The exits happen after the except blocks: an exception kept alive as the context of
    # SystemExit would keep its frames, and a DDP module in them, alive into interpreter shutdown.
    try:
        run_training(argv)
        return
    except TrainingInterrupted as interrupted:
        if str(interrupted):
            print(f"fastvae-train: {interrupted}", file=sys.stderr)
        status: int | str = EXIT_INTERRUPTED
    except (RunFolderError, DataError, BackendUnavailableError, TrainingDiverged, ValueError) as error:
        status = f"fastvae-train: error: {error}"
    sys.exit(status)


if __name__ == "__main__":
    main()
