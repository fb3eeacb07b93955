"""What fastvae-train shows: rich progress bars with live numbers, and the closing summary.

Only rank 0 draws; other ranks get a disabled display with the same interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# How the bars and the log name the training objectives' statistics (trainer.ELBOObjective.STATS and
# IWAEObjective.STATS); the importance-weighted bound is not an ELBO and is never called one.
STAT_LABELS = {"neg_elbo": "-ELBO", "recon": "recon", "kl": "KL", "neg_iw_bound": "-IW bound"}


class TrainProgress:
    def __init__(self, epochs: int, enabled: bool, console: Console | None = None) -> None:
        self.console = console or Console()
        self.epochs, self.enabled = epochs, enabled
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[live]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = None

    def __enter__(self) -> TrainProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def start_epoch(self, epoch: int, batches: int, done: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(f"epoch {epoch + 1}/{self.epochs}", total=batches, completed=done, live="")

    def update(self, batch: int, means: dict[str, float], seconds: float, images: float) -> None:
        """means: the training stats per image, by name (STAT_LABELS), over the `images` this rank
        trained on since the epoch (re)started."""
        shown = "  ".join(f"{STAT_LABELS[name]} {value:7.2f}" for name, value in means.items())
        live = f"{shown}  {images / max(seconds, 1e-9):8.0f} samples/s/rank"
        self.bar.update(self.task, completed=batch, live=live)

    def end_epoch(self, row: dict) -> None:
        if self.enabled:
            name, value = train_headline(row)
            self.bar.console.log(
                f"epoch {row['epoch']}: train {STAT_LABELS[name]} {value:.2f}, "
                f"val -ELBO {row['val_neg_elbo']:.2f} nats, {row['samples_per_s']:.0f} samples/s"
            )

    def note(self, text: str) -> None:
        """A line of its own above the bars (rank 0 only)."""
        if self.enabled:
            self.bar.console.print(text)

    @contextlib.contextmanager
    def evaluating(self, images: int) -> Iterator[Callable[[int], None]]:
        """A bar over the images that get the importance-sampled NLL; yields advance(n)."""
        task = self.bar.add_task("test NLL", total=max(images, 1), live="importance sampling")
        try:
            yield lambda n: self.bar.advance(task, n)
        finally:
            self.bar.remove_task(task)


def train_headline(row: dict) -> tuple[str, float]:
    """(name, value) of the objective a metrics row's training numbers measure: -ELBO or -IW bound."""
    name = "neg_elbo" if "train_neg_elbo" in row else "neg_iw_bound"
    return name, row[f"train_{name}"]


def summary_table(history: list[dict], test: dict, wall_seconds: float, run_dir: str) -> Table:
    """The closing table: the last epoch's train/val numbers and the test results (nats per datapoint);
    a run trained on the importance-weighted bound shows it in a column of its own, never as -ELBO."""
    table = Table(title=f"fastvae-train summary ({run_dir}, {wall_seconds:.1f} s)", caption=test.get("nll_note"))
    table.add_column("split")
    last = history[-1] if history else {}
    iw_bound = f"-IW bound (K={last.get('samples')})"
    columns = ("-ELBO", "recon", "KL", *((iw_bound,) if "train_neg_iw_bound" in last else ()), "NLL (IW)")
    for name in columns:
        table.add_column(name, justify="right")

    def row(split: str, values: dict) -> None:
        shown = {
            name: f"{values[key]:.2f}"
            for name, key in (("-ELBO", "neg_elbo"), ("recon", "recon"), ("KL", "kl"), (iw_bound, "neg_iw_bound"))
            if key in values
        }
        shown["NLL (IW)"] = values.get("nll", "")
        table.add_row(split, *(shown.get(name, "") for name in columns))

    for split in ("train", "val"):
        values = {key[len(split) + 1 :]: value for key, value in last.items() if key.startswith(f"{split}_")}
        if values:
            row(split, values)
    nll = (
        (
            f"{test['test_nll']:.2f} ± {test['test_nll_stderr']:.2f} (K={test['iw_samples']}, "
            f"{test['iw_examples']} images)"
        )
        if "test_nll" in test
        else "skipped"
    )
    row("test", {"neg_elbo": test["test_neg_elbo"], "recon": test["test_recon"], "kl": test["test_kl"], "nll": nll})
    return table
