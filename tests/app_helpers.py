"""Tiny datasets, runs and exit checks shared by the training-app tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastvae.train import checkpoint as ckpt
from fastvae.train import data
from fastvae.train.cli import main

SIDE, TRAIN_N, TEST_N, VAL_N, BATCH = 8, 96, 24, 16, 16  # 5 steps per epoch


def tiny_dataset(folder: Path, side: int = SIDE, train_n: int = TRAIN_N, test_n: int = TEST_N) -> Path:
    g = torch.Generator().manual_seed(0)

    def split(n):
        # Two blob classes, so the model has something to learn in a few steps.
        labels = torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8)
        base = torch.zeros(n, side, side)
        base[labels == 0, : side // 2] = 220.0
        base[labels == 1, side // 2 :] = 220.0
        noise = torch.randint(0, 30, (n, side, side), generator=g).float()
        return (base + noise).clamp(0, 255).to(torch.uint8), labels

    return data.write_idx_dataset(folder, split(train_n), split(test_n))


def tiny_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--hidden-dims",
        "16",
        "--latent-dim",
        "2",
        "--batch-size",
        str(BATCH),
        "--val-size",
        str(VAL_N),
        "--iw-samples",
        "4",
        "--iw-examples",
        "10",
        "--eval-batch-size",
        "8",
        "--log-every",
        "2",
        "--no-plots",
        *extra,
    ]


def final_state(run_dir: Path) -> dict:
    return ckpt.load_checkpoint(run_dir / "last.pt")


def expect_exit(argv: list[str], *fragments: str, entry=main, prog: str = "fastvae-train") -> str:
    """Run a CLI entry that must fail with `<prog>: error: ...` holding every fragment; returns the message."""
    with pytest.raises(SystemExit) as info:
        entry(argv)
    message = str(info.value.code)
    assert message.startswith(f"{prog}: error:"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message
