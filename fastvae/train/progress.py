"""What fastvae-train shows: rich progress bars with live numbers, and the closing summary.

Only rank 0 draws; other ranks get a disabled display with the same interface.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class TrainProgress:
    def __init__(self, epochs: int, enabled: bool, console: Console | None = None) -> None:
        self.console = console or Console()
        self.epochs, self.enabled = epochs, enabled
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[live]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=not enabled)
        self.task = None

    def __enter__(self) -> "TrainProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def start_epoch(self, epoch: int, batches: int, done: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(f"epoch {epoch + 1}/{self.epochs}", total=batches, completed=done,
                                      live="")

    def update(self, batch: int, sums: list[float], seconds: float) -> None:
        """sums = (sum of -log p(x|z), sum of KL, images) on this rank since the epoch (re)started."""
        recon, kl, count = sums
        count = max(count, 1.0)
        live = (f"-elbo {(recon + kl) / count:7.2f}  recon {recon / count:7.2f}  kl {kl / count:6.2f}  "
                f"{count / max(seconds, 1e-9):8.0f} samples/s/rank")
        self.bar.update(self.task, completed=batch, live=live)

    def end_epoch(self, row: dict) -> None:
        if self.enabled:
            self.bar.console.log(f"epoch {row['epoch']}: train -ELBO {row['train_neg_elbo']:.2f}, "
                                 f"val -ELBO {row['val_neg_elbo']:.2f} nats, {row['samples_per_s']:.0f} samples/s")

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


def summary_table(history: list[dict], test: dict, wall_seconds: float, run_dir: str) -> Table:
    """The closing table: the last epoch's train/val numbers and the test results (nats per datapoint)."""
    table = Table(title=f"fastvae-train summary ({run_dir}, {wall_seconds:.1f} s)")
    table.add_column("split")
    for name in ("-ELBO", "recon", "KL", "NLL (IW)"):
        table.add_column(name, justify="right")
    last = history[-1] if history else {}
    for split in ("train", "val"):
        if f"{split}_neg_elbo" in last:
            table.add_row(split, f"{last[f'{split}_neg_elbo']:.2f}", f"{last[f'{split}_recon']:.2f}",
                          f"{last[f'{split}_kl']:.2f}", "")
    nll = (f"{test['test_nll']:.2f} ± {test['test_nll_stderr']:.2f} (K={test['iw_samples']}, "
           f"{test['iw_examples']} images)") if "test_nll" in test else "skipped"
    table.add_row("test", f"{test['test_neg_elbo']:.2f}", f"{test['test_recon']:.2f}", f"{test['test_kl']:.2f}", nll)
    return table
