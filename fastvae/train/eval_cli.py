"""fastvae-eval: evaluate a fastvae-train checkpoint on the test set, -ELBO and importance-sampled NLL in nats.

    fastvae-eval runs/20261125-130340                    # the run's best.pt
    fastvae-eval runs/20261125-130340/last.pt --iw-samples 5000

The results are printed first and then saved as JSON, so a folder that cannot be
written loses nothing but the file (the exit status says it failed).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from rich.console import Console

from fastvae.backend import BACKEND_CHOICES, process_backend, unavailable_reason
from fastvae.errors import BackendUnavailableError
from fastvae.train.checkpoint import (
    BEST,
    LAST,
    check_run_checkpoints,
    checkpoint_path,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
)
from fastvae.train.config import (
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_IW_BATCH_SIZE,
    DEFAULT_IW_SAMPLES,
    DEVICE_CHOICES,
    TrainConfig,
    pick_device,
    require_at_least,
    require_seed,
)
from fastvae.train.data import KNOWN_DATASETS, DataError, Split, load_test_split, prepare_targets
from fastvae.train.evaluate import evaluate_test, likelihood_fields, results_table
from fastvae.train.run_folder import RunFolderError, to_json, write_file


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastvae-eval",
        description="Evaluate a fastvae-train checkpoint on the test set: -ELBO and importance-sampled NLL in nats.",
    )
    parser.add_argument("checkpoint", help="a run folder (uses its best.pt) or a .pt checkpoint file")
    parser.add_argument(
        "--iw-samples",
        type=int,
        default=DEFAULT_IW_SAMPLES,
        help=f"importance samples per test image; 0 skips the NLL (default: {DEFAULT_IW_SAMPLES})",
    )
    parser.add_argument(
        "--iw-batch-size",
        type=int,
        default=DEFAULT_IW_BATCH_SIZE,
        help=f"(image, sample) pairs per decoder call; bounds memory (default: {DEFAULT_IW_BATCH_SIZE})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_EVAL_BATCH_SIZE,
        help=f"test images per batch (default: {DEFAULT_EVAL_BATCH_SIZE})",
    )
    parser.add_argument(
        "--iw-examples",
        type=int,
        default=0,
        help="test images that get the NLL (the -ELBO always uses all); 0 means all (default: 0)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="where the test IDX files are: for a checkpoint trained on a named dataset, the "
        "folder to look in first; for one trained on a dataset folder, the folder to use "
        "instead of it (default: what the checkpoint's config recorded)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="auto",
        help="where to evaluate (default: auto = cuda when available)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="fastvae backend for the ops; auto defers to $FASTVAE_BACKEND (default: auto)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise (default: 0)")
    parser.add_argument(
        "--output", default=None, help="JSON file for the results (default: eval-<checkpoint name>.json beside it)"
    )
    return parser


def _validate(args: argparse.Namespace) -> None:
    require_at_least("--iw-samples", args.iw_samples, 0)
    require_at_least("--iw-examples", args.iw_examples, 0)
    require_at_least("--iw-batch-size", args.iw_batch_size, 1)
    require_at_least("--batch-size", args.batch_size, 1)
    require_seed("--seed", args.seed)


def _checkpoint_file(arg: str) -> Path:
    """A checkpoint file as given, or a run folder's best.pt once it is checked against its last.pt."""
    path = Path(arg).expanduser()
    if not path.is_dir():
        return resolve_checkpoint(path)
    if checkpoint_path(path, LAST).is_file():
        check_run_checkpoints(path)
        return checkpoint_path(path, BEST)
    if checkpoint_path(path, BEST).is_file():
        return checkpoint_path(path, BEST)
    return resolve_checkpoint(path)


def _test_split(config: TrainConfig, data_dir: str | None, image_shape: tuple[int, ...]) -> Split:
    """The test split the checkpoint was trained for; --data-dir replaces a dataset folder."""
    dataset = config.dataset
    if dataset not in KNOWN_DATASETS:
        if data_dir:
            dataset = data_dir
        elif not Path(dataset).expanduser().is_dir():
            raise DataError(
                f"the checkpoint was trained on the dataset folder {dataset}, which is not there; "
                f"pass --data-dir FOLDER holding its t10k-images-idx3-ubyte[.gz] and "
                f"t10k-labels-idx1-ubyte[.gz]"
            )
    test, folder = load_test_split(dataset, data_dir or config.data_dir)
    if tuple(test.images.shape[1:]) != tuple(image_shape):
        shown = "x".join(str(n) for n in test.images.shape[1:])
        wanted = "x".join(str(n) for n in image_shape)
        raise DataError(
            f"the test images in {folder} are {shown} (CxHxW) but the checkpoint's model takes "
            f"{wanted}: it was trained on another dataset ({config.dataset}); pass --data-dir with "
            f"that one's test files"
        )
    return test


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    """Evaluate the checkpoint `args` names; returns the results (nothing is written)."""
    _validate(args)
    device = pick_device(args.device)
    if args.backend != "auto" and (reason := unavailable_reason(args.backend, device)) is not None:
        raise BackendUnavailableError(f"--backend {args.backend} cannot run on {device}: {reason}")
    path = _checkpoint_file(args.checkpoint)
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path).to(device)
    config = TrainConfig.from_dict(state["config"])
    test = _test_split(config, args.data_dir, model.config.image_shape)
    test = prepare_targets(test, config.binarize, "test")
    backend = contextlib.nullcontext() if args.backend == "auto" else process_backend(args.backend)
    with backend:
        result = evaluate_test(
            model,
            test,
            iw_samples=args.iw_samples,
            iw_examples=args.iw_examples,
            iw_batch_size=args.iw_batch_size,
            batch_size=args.batch_size,
            device=device,
            seed=args.seed,
        )
    result.update({**likelihood_fields(model.likelihood, config.binarize), "checkpoint": str(path)})
    return result


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        result = run_eval(args)
    except (RunFolderError, DataError, BackendUnavailableError, ValueError) as error:
        sys.exit(f"fastvae-eval: error: {error}")
    Console().print(results_table(result, "fastvae-eval (nats per datapoint)"))
    checkpoint = Path(result["checkpoint"])
    output = Path(args.output) if args.output else checkpoint.with_name(f"eval-{checkpoint.stem}.json")
    try:
        write_file(output, to_json(result, indent=2) + "\n")
    except RunFolderError as error:
        sys.exit(
            f"fastvae-eval: error: {error}. The results are printed above; pass --output FILE to save them elsewhere"
        )


if __name__ == "__main__":
    main()
