"""Checkpoints: atomic writes, validated reads, and the RNG state a resume needs.

A checkpoint is one `torch.save` dict (FORMAT_VERSION below). It is written to a
temporary file in the same folder, fsynced, then renamed over the old one, so a
crash or a full disk leaves the previous good checkpoint in place.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
CHECKPOINT_NAMES = ("last", "best")
SUFFIX = ".pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the fix."""


def checkpoint_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / f"{name}{SUFFIX}"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` via a temp file + rename; on any failure the old file stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is untouched" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"could not save checkpoint {path}: {error.strerror or error}; {kept}. "
                              f"Free disk space or pass another --out folder") from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def resolve_checkpoint(run_or_checkpoint: str | os.PathLike) -> Path:
    """A checkpoint file from a run folder (its last.pt) or a checkpoint path."""
    path = Path(run_or_checkpoint).expanduser()
    if path.is_dir():
        path = checkpoint_path(path, "last")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass a run folder holding last.pt, or a .pt file")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and sanity-check a checkpoint written by `save_atomic`."""
    path = resolve_checkpoint(path)
    try:
        # weights_only stays True: the dict holds tensors, numbers, strings and RNG byte tensors only.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or corrupt "
                              f"({type(error).__name__}: {error}). Use the other checkpoint of the run "
                              f"(best.pt / last.pt) or train again") from error
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a fastvae-train checkpoint (format {FORMAT_VERSION})")
    return state


def check_same_model(saved: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    """Raise unless the model config in a checkpoint matches the one this run builds."""
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, this run {wanted.get(key)!r}"
             for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with another model config ("
                              + "; ".join(diffs) + "). Drop the conflicting flags to use the checkpoint's "
                              "values, or start a new run with another --out")


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step can touch: torch CPU (the fused ops draw their seeds here), CUDA, Python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(saved: Any) -> tuple:
    """random.getstate() comes back from torch.load with lists where tuples were; rebuild it."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss
