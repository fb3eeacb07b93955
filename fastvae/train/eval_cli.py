"""fastvae-eval: evaluate a fastvae-train checkpoint on the test set, -ELBO and importance-sampled NLL in nats.

    fastvae-eval runs/20261125-130340                    # the run's best.pt
    fastvae-eval runs/20261125-130340/last.pt --iw-samples 5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from rich.console import Console

import fastvae
from fastvae.backend import BACKEND_CHOICES
from fastvae.errors import BackendUnavailableError
from fastvae.train.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, resolve_checkpoint
from fastvae.train.config import (DEFAULT_EVAL_BATCH_SIZE, DEFAULT_IW_BATCH_SIZE, DEFAULT_IW_SAMPLES,
                                  DEVICE_CHOICES, TrainConfig, pick_device)
from fastvae.train.data import DataError, load_datasets, prepare_targets
from fastvae.train.evaluate import evaluate_test, results_table
from fastvae.train.models import VAEConfig, build_model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvae-eval", description="Evaluate a fastvae-train checkpoint "
                                     "on the test set: -ELBO and importance-sampled NLL in nats.")
    parser.add_argument("checkpoint", help="a run folder (uses its best.pt) or a .pt checkpoint file")
    parser.add_argument("--iw-samples", type=int, default=DEFAULT_IW_SAMPLES,
                        help=f"importance samples per test image; 0 skips the NLL (default: {DEFAULT_IW_SAMPLES})")
    parser.add_argument("--iw-batch-size", type=int, default=DEFAULT_IW_BATCH_SIZE,
                        help=f"(image, sample) pairs per decoder call; bounds memory "
                             f"(default: {DEFAULT_IW_BATCH_SIZE})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_EVAL_BATCH_SIZE,
                        help=f"test images per batch (default: {DEFAULT_EVAL_BATCH_SIZE})")
    parser.add_argument("--iw-examples", type=int, default=0,
                        help="test images that get the NLL (the -ELBO always uses all); 0 means all (default: 0)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the IDX files (default: the one recorded in the checkpoint's config)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="where to evaluate (default: auto = cuda when available)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="fastvae backend for the ops; auto defers to $FASTVAE_BACKEND (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise (default: 0)")
    parser.add_argument("--output", default=None,
                        help="JSON file for the results (default: eval-<checkpoint name>.json beside it)")
    return parser


def _checkpoint_file(arg: str) -> Path:
    path = Path(arg).expanduser()
    if path.is_dir() and checkpoint_path(path, "best").is_file():
        return checkpoint_path(path, "best")
    return resolve_checkpoint(path)


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    path = _checkpoint_file(args.checkpoint)
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    device = pick_device(args.device)
    model = build_model(VAEConfig(**state["model_config"])).to(device)
    model.load_state_dict(state["model"])
    data = load_datasets(config.dataset, args.data_dir or config.data_dir, config.val_size, config.seed)
    test = prepare_targets(data.test, config.binarize, "test")
    backend = contextlib.nullcontext() if args.backend == "auto" else fastvae.use_backend(args.backend)
    with backend:
        result = evaluate_test(model, test, iw_samples=args.iw_samples,
                               iw_examples=args.iw_examples, iw_batch_size=args.iw_batch_size,
                               batch_size=args.batch_size, device=device, seed=args.seed)
    result["checkpoint"] = str(path)
    output = Path(args.output) if args.output else path.with_name(f"eval-{path.stem}.json")
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        result = run_eval(args)
    except (CheckpointError, DataError, BackendUnavailableError, ValueError) as error:
        sys.exit(f"fastvae-eval: error: {error}")
    Console().print(results_table(result, "fastvae-eval (nats per datapoint)"))


if __name__ == "__main__":
    main()
