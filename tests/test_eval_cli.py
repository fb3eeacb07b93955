"""fastvae-eval: flag checks, checkpoints that do not hold together, and finding the test data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastvae.train import checkpoint as ckpt
from fastvae.train.cli import run_training
from fastvae.train.eval_cli import main as eval_main

from app_helpers import SIDE, TEST_N, expect_exit, tiny_args, tiny_dataset


def expect_eval_exit(argv: list[str], *fragments: str) -> str:
    return expect_exit(argv, *fragments, entry=eval_main, prog="fastvae-eval")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(a one-epoch run folder, the dataset folder it was trained on)."""
    root = tmp_path_factory.mktemp("eval")
    dataset = tiny_dataset(root / "idx")
    run_training(tiny_args(dataset, root / "run", "--epochs", "1", "--iw-samples", "0"))
    return root / "run", dataset


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--iw-batch-size", "0", "--iw-batch-size must be >= 1, got 0"),
        ("--iw-samples", "-1", "--iw-samples must be >= 0, got -1"),
        ("--iw-examples", "-3", "--iw-examples must be >= 0, got -3"),
        ("--seed", str(2**70), "--seed must be between 0 and 2**63 - 1"),
    ],
)
def test_flag_values_are_checked(trained, flag, value, message):
    run, _ = trained
    expect_eval_exit([str(run), flag, value], message)
    assert not (run / "eval-best.json").exists()


def test_an_unavailable_backend_is_refused(trained, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("triton can run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expect_eval_exit([str(trained[0]), "--backend", "triton", "--device", "cpu"], "--backend triton cannot run on cpu")


def _rewritten(run: Path, tmp_path: Path, **changes) -> Path:
    """best.pt of `run` with some entries changed (None: removed), sealed again as a valid checkpoint."""
    state = ckpt.load_checkpoint(run / "best.pt")
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    path = tmp_path / "changed.pt"
    ckpt.save_checkpoint(state, path)
    return path


def test_weights_that_do_not_fit_the_model_config(trained, tmp_path):
    run, _ = trained
    config = {**ckpt.load_checkpoint(run / "best.pt")["model_config"], "latent_dim": 3}
    path = _rewritten(run, tmp_path, model_config=config)
    expect_eval_exit([str(path)], str(path), "weights that do not fit its model_config", "size mismatch")


def test_a_checkpoint_without_weights(trained, tmp_path):
    path = _rewritten(trained[0], tmp_path, model=None)
    expect_eval_exit([str(path)], str(path), "lacks model", "not a complete fastvae-train checkpoint")


def test_data_dir_replaces_a_moved_dataset_folder(tmp_path):
    moved, renamed = tmp_path / "data", tmp_path / "data-moved"
    tiny_dataset(moved)
    run = tmp_path / "run"
    run_training(tiny_args(moved, run, "--epochs", "1", "--iw-samples", "0"))
    moved.rename(renamed)
    expect_eval_exit(
        [str(run), "--iw-samples", "2"], f"trained on the dataset folder {moved}", "which is not there", "--data-dir"
    )
    eval_main([str(run), "--iw-samples", "2", "--data-dir", str(renamed)])
    assert json.loads((run / "eval-best.json").read_text())["test_examples"] == TEST_N


def test_only_the_test_files_are_needed(trained, tmp_path):
    """A folder with a test split alone (no training images, so no room for the run's --val-size)."""
    run, _ = trained
    test_only = tiny_dataset(tmp_path / "test-only", test_n=7)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (test_only / f"{stem}.gz").unlink()
    output = tmp_path / "out.json"
    eval_main([str(run), "--iw-samples", "2", "--data-dir", str(test_only), "--output", str(output)])
    assert json.loads(output.read_text())["test_examples"] == 7


def test_images_of_another_size_are_named(trained, tmp_path):
    bigger = tiny_dataset(tmp_path / "bigger", side=12)
    expect_eval_exit(
        [str(trained[0]), "--data-dir", str(bigger)],
        "test images in",
        "are 1x12x12",
        f"takes 1x{SIDE}x{SIDE}",
        "trained on another dataset",
    )
