"""The run folder across kills, second processes, full disks and Ctrl-C; checkpoint checksums and JSON.

Kills are simulated deterministically: a BaseException raised from inside a save
stops the run there exactly as SIGKILL would, minus the cleanup SIGKILL skips
(which `test_stale_temp_files_of_dead_processes_are_removed` covers on its own).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastvae.train import checkpoint as ckpt
from fastvae.train import run_folder, trainer
from fastvae.train.cli import main, run_training
from fastvae.train.distributed import DistInfo
from fastvae.train.eval_cli import main as eval_main
from fastvae.train.run_folder import RunFolderError, RunFolderLock, to_json, write_file

from app_helpers import expect_exit, final_state, tiny_args, tiny_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("idx"))


@pytest.fixture()
def one_epoch_run(dataset, tmp_path) -> Path:
    out = tmp_path / "run"
    run_training(tiny_args(dataset, out, "--epochs", "1", "--iw-samples", "0"))
    return out


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def leftover_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


class SimulatedKill(BaseException):
    """Stands for SIGKILL at one exact instant of a save."""


# --------------------------------------------------------------------------- kills between files
def test_kill_between_last_and_best_is_repaired_on_resume(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = tiny_args(dataset, out, "--epochs", "2", "--lr", "1e-2", "--iw-samples", "0")
    real_replace = os.replace

    def killed_before_best(src, dst):
        if Path(dst).name == "best.pt" and final_state(out)["epoch"] == 2:
            raise SimulatedKill
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_best)
    with pytest.raises(SimulatedKill):  # epoch 2 improved on epoch 1, so its save wrote best.pt
        run_training(args)
    monkeypatch.setattr(os, "replace", real_replace)
    last = final_state(out)
    assert last["epoch"] == 2 and last["best_step"] == last["step"] == 10
    assert ckpt.load_checkpoint(out / "best.pt")["step"] == 5  # one improvement behind
    expect_exit(
        [str(out), "--iw-samples", "0"],
        "a save stopped between last.pt and best.pt",
        "Resuming the run repairs",
        entry=eval_main,
        prog="fastvae-eval",
    )

    run_training(["--resume", str(out)])  # nothing left to train: straight to the final evaluation
    assert (out / "best.pt").read_bytes() == (out / "last.pt").read_bytes()
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved["best_epoch"] == 2 and saved["best_step"] == 10


def test_a_best_checkpoint_that_last_does_not_name_is_an_error(one_epoch_run):
    last = final_state(one_epoch_run)
    assert last["best_step"] == last["step"] == 5
    # As if training went on to step 8 without improving, and best.pt were then swapped for another one.
    ckpt.save_checkpoint({**last, "step": 8}, one_epoch_run / "last.pt")
    ckpt.save_checkpoint({**last, "step": 3}, one_epoch_run / "best.pt")
    expect_exit(
        ["--resume", str(one_epoch_run)], "best.pt holds step 3", "names step 5 as the best", "Restore it from a backup"
    )
    (one_epoch_run / "best.pt").unlink()
    expect_exit([str(one_epoch_run)], "best.pt is missing", entry=eval_main, prog="fastvae-eval")


def test_kill_between_last_and_metrics_is_repaired_on_resume(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = tiny_args(dataset, out, "--epochs", "2", "--iw-samples", "0")
    real_replace = os.replace

    def killed_before_metrics(src, dst):
        if Path(dst).name == "metrics.jsonl" and final_state(out)["epoch"] == 2:
            raise SimulatedKill
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_metrics)
    with pytest.raises(SimulatedKill):
        run_training(args)
    monkeypatch.setattr(os, "replace", real_replace)
    assert [row["epoch"] for row in metrics_rows(out)] == [1]
    run_training(["--resume", str(out)])
    assert [row["epoch"] for row in metrics_rows(out)] == [1, 2]


# --------------------------------------------------------------------------- a second process
def test_a_second_process_on_the_same_folder_is_refused(dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # Another fastvae-train as the lock protocol sees it (flock, then its pid), without importing torch.
    hold_the_lock = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode()); "
        "print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold_the_lock, str(out / run_folder.LOCK_NAME)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        expect_exit(
            tiny_args(dataset, out, "--epochs", "1"),
            f"in use by another fastvae-train (pid {holder.pid})",
            f"kill {holder.pid}",
            f"--resume {out}",
            "another --out",
        )
        assert not (out / "last.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    run_training(tiny_args(dataset, out, "--epochs", "1", "--iw-samples", "0"))  # the kernel dropped the lock
    assert final_state(out)["epoch"] == 1


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    # Another open file description conflicts, even in the same process.
    with RunFolderLock(tmp_path), pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
        RunFolderLock(tmp_path)
    RunFolderLock(tmp_path).release()


# --------------------------------------------------------------------------- overwrite
def test_a_new_run_refuses_a_folder_that_holds_one(dataset, one_epoch_run):
    before = {p.name: p.read_bytes() for p in one_epoch_run.iterdir() if p.is_file()}
    expect_exit(
        tiny_args(dataset, one_epoch_run, "--epochs", "1"),
        "already holds a run",
        f"--resume {one_epoch_run}",
        "--overwrite",
        "another --out",
    )
    after = {p.name: p.read_bytes() for p in one_epoch_run.iterdir() if p.is_file()}
    assert after == before


def test_overwrite_starts_over(dataset, one_epoch_run):
    (one_epoch_run / "eval-best.json").write_text("{}")  # fastvae-eval's view of the old best.pt
    (one_epoch_run / "notes.txt").write_text("mine")
    run_training(tiny_args(dataset, one_epoch_run, "--epochs", "2", "--iw-samples", "0", "--overwrite"))
    assert [row["epoch"] for row in metrics_rows(one_epoch_run)] == [1, 2]
    assert not (one_epoch_run / "eval-best.json").exists()
    assert (one_epoch_run / "notes.txt").read_text() == "mine"


def test_overwrite_may_not_delete_what_resume_continues(one_epoch_run):
    expect_exit(["--resume", str(one_epoch_run), "--overwrite"], "--overwrite would delete")


def test_resume_into_another_folder_copies_the_run(one_epoch_run, tmp_path):
    branch = tmp_path / "branch"
    run_training(["--resume", str(one_epoch_run), "--out", str(branch), "--epochs", "2"])
    assert final_state(branch)["epoch"] == 2 and final_state(one_epoch_run)["epoch"] == 1
    assert ckpt.load_checkpoint(branch / "best.pt")["step"] == final_state(branch)["best_step"]


# --------------------------------------------------------------------------- temp files
def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_files_of_dead_processes_are_removed(dataset, one_epoch_run):
    dead = one_epoch_run / f".last.pt.tmp-{_dead_pid()}"
    live = one_epoch_run / f".eval-best.json.tmp-{os.getppid()}"  # a live process may be writing it
    dead.write_bytes(b"half a checkpoint")
    live.write_bytes(b"{")
    run_training(["--resume", str(one_epoch_run), "--epochs", "2"])
    assert not dead.exists() and live.exists()


# --------------------------------------------------------------------------- bit flips
def _flip_two_bytes_in_the_weights(path: Path) -> None:
    """Flip two bytes in the middle of the largest tensor stored in a torch.save zip."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = (
        int.from_bytes(raw[entry.header_offset + at : entry.header_offset + at + 2], "little") for at in (26, 28)
    )
    middle = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    raw[middle] ^= 0x40
    raw[middle + 1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_the_weights_is_caught(one_epoch_run):
    best = one_epoch_run / "best.pt"
    _flip_two_bytes_in_the_weights(best)
    expect_exit(
        [str(best)],
        str(best),
        "is damaged",
        "does not match the sha256",
        "backup",
        entry=eval_main,
        prog="fastvae-eval",
    )
    last = one_epoch_run / "last.pt"
    _flip_two_bytes_in_the_weights(last)
    expect_exit(["--resume", str(one_epoch_run), "--epochs", "2"], str(last), "is damaged")


class NotAllowedInCheckpoints:
    """Pickled by value, so torch.load's safe loader refuses it."""


def test_an_unreadable_checkpoint_does_not_advise_unsafe_loading(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": NotAllowedInCheckpoints()}, foreign)
    message = expect_exit(
        [str(foreign)],
        str(foreign),
        "corrupt, or it is not a fastvae-train checkpoint",
        entry=eval_main,
        prog="fastvae-eval",
    )
    assert "weights_only" not in message
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip at all")
    expect_exit([str(garbage)], str(garbage), "truncated or corrupt", entry=eval_main, prog="fastvae-eval")


def test_the_digest_survives_a_save_load_round_trip(tmp_path):
    state = {
        "t": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "python": (3, tuple(range(5)), None),
        "nested": {1: [0.1, float("inf")], "s": "x"},
    }
    path = tmp_path / "c.pt"
    torch.save({**state, "sha256": ckpt.content_digest(state)}, path)
    loaded = torch.load(path, weights_only=True)
    assert ckpt.content_digest(loaded) == loaded["sha256"]
    loaded["nested"][1][0] = 0.2
    assert ckpt.content_digest(loaded) != loaded["sha256"]


# --------------------------------------------------------------------------- full disk, Ctrl-C, read-only
class _NoSpaceLeft(io.RawIOBase):
    """A file on a full disk: it opens, and every write fails with ENOSPC."""

    def __init__(self, real) -> None:
        self.real = real

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()
        super().close()


def _full_disk(monkeypatch, folder: Path) -> None:
    """From now on, checkpoint files under `folder` cannot be written, as on a full disk; torch.save
    into such a file fails the way torch's zip writer does there (a RuntimeError, not an OSError)."""
    real_open, real_save = builtins.open, torch.save

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        inside = str(file).startswith(str(folder)) and ".pt" in Path(file).name
        return _NoSpaceLeft(handle) if inside and any(c in mode for c in "wax+") else handle

    def save_on_full_disk(obj, target, *args, **kwargs):
        if isinstance(target, _NoSpaceLeft):  # what torch raises there, on a real full disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")  # noqa: TRY004
        real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    monkeypatch.setattr(torch, "save", save_on_full_disk)


def test_full_disk_keeps_the_previous_checkpoint(one_epoch_run, monkeypatch):
    last = one_epoch_run / "last.pt"
    before = last.read_bytes()
    _full_disk(monkeypatch, one_epoch_run)
    expect_exit(
        ["--resume", str(one_epoch_run), "--epochs", "2"],
        f"could not write {last}",
        "No space left on device",
        "previous last.pt is untouched",
        "Free disk space",
    )
    assert last.read_bytes() == before
    assert leftover_temp_files(one_epoch_run) == []


def test_first_save_on_a_full_disk(tmp_path, monkeypatch):
    _full_disk(monkeypatch, tmp_path)
    with pytest.raises(RunFolderError, match="no new.pt was written"):
        ckpt.save_checkpoint({"a": torch.ones(2)}, tmp_path / "new.pt")
    assert list(tmp_path.iterdir()) == []


def _interrupt_saving_last(monkeypatch, where: str) -> None:
    """Ctrl-C while last.pt is serialized, or once its bytes are in the temp file (before the rename)."""
    if where == "serializing":

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(torch, "save", interrupted)
        return
    real_replace = os.replace

    def interrupted_before_rename(src, dst):
        if Path(dst).name == "last.pt":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_before_rename)


@pytest.mark.parametrize("where", ["serializing", "renaming"])
def test_ctrl_c_during_a_save_ends_with_how_to_resume(one_epoch_run, monkeypatch, capsys, where):
    last = one_epoch_run / "last.pt"
    before = last.read_bytes()
    _interrupt_saving_last(monkeypatch, where)
    try:
        main(["--resume", str(one_epoch_run), "--epochs", "2"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended fastvae-train with a traceback")
    except SystemExit as stopped:
        assert stopped.code == 130
    else:
        pytest.fail("the interrupted run did not stop")
    assert (
        f"fastvae-train: interrupted; the run can be resumed with: fastvae-train --resume {one_epoch_run}"
        in capsys.readouterr().err
    )
    assert last.read_bytes() == before
    assert leftover_temp_files(one_epoch_run) == []


def _read_only(monkeypatch, folder: Path) -> None:
    """Writing anything under `folder` fails with EROFS, as on a read-only mount."""
    refused = OSError(errno.EROFS, "Read-only file system")
    real_open, real_os_open = builtins.open, os.open

    def open_read_only(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(folder)) and any(c in mode for c in "wax+"):
            raise refused
        return real_open(file, mode, *args, **kwargs)

    def os_open_read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refused
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_read_only)
    monkeypatch.setattr(io, "open", open_read_only)
    monkeypatch.setattr(os, "open", os_open_read_only)


def test_a_read_only_out_folder_is_a_message(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    _read_only(monkeypatch, out)
    expect_exit(
        tiny_args(dataset, out, "--epochs", "1"),
        str(out),
        "Read-only file system",
        "Make the folder writable, or pass another --out",
    )


def test_eval_prints_the_results_before_a_failed_write(one_epoch_run, monkeypatch, capsys):
    _read_only(monkeypatch, one_epoch_run)
    expect_exit(
        [str(one_epoch_run), "--iw-samples", "2"],
        "could not write",
        "eval-best.json",
        "Read-only file system",
        "results are printed above",
        "--output",
        entry=eval_main,
        prog="fastvae-eval",
    )
    assert "test_nll" in capsys.readouterr().out


# --------------------------------------------------------------------------- strict JSON
def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_maps_non_finite_numbers_to_null():
    value = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"),)], "c": {"d": 2}}
    assert _strict_json(to_json(value)) == {"a": None, "b": [1.5, None, [None]], "c": {"d": 2}}


def test_eval_json_is_strict(one_epoch_run, monkeypatch):
    from fastvae.train import eval_cli

    monkeypatch.setattr(
        eval_cli, "evaluate_test", lambda *args, **kwargs: {"test_neg_elbo": float("nan"), "test_nll": float("inf")}
    )
    eval_main([str(one_epoch_run)])
    saved = _strict_json((one_epoch_run / "eval-best.json").read_text())
    assert saved["test_neg_elbo"] is None and saved["test_nll"] is None


def test_metrics_jsonl_is_strict(tmp_path):
    run = SimpleNamespace(
        run_dir=tmp_path, dist=DistInfo(), state=SimpleNamespace(history=[{"epoch": 1, "train_kl": float("nan")}])
    )
    trainer.write_metrics(run)
    assert [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"epoch": 1, "train_kl": None}
    ]


def test_write_file_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    write_file(path, "old")
    write_file(path, b"new")
    assert path.read_text() == "new" and leftover_temp_files(tmp_path) == []
    assert run_folder.temp_path(path).name == f".a.json.tmp-{os.getpid()}"
