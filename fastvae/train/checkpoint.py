"""Checkpoints: sealed with a digest of their content, written atomically, verified on every read.

A checkpoint is one `torch.save` dict (FORMAT_VERSION below). Its "sha256" entry is
the digest of everything else in it (`content_digest`), and `load_checkpoint`
recomputes it, so a flipped bit in the weights is an error naming the file instead
of a silently different model. The dict is serialized in memory and written with
`run_folder.write_file` (temp file, fsync, rename), so a full disk or a kill
leaves the previous checkpoint in place and every write error is an OSError of
our own write (torch's zip writer reports a full disk as a RuntimeError).

A run folder holds last.pt (where training stands) and best.pt (the lowest
validation -ELBO so far). last.pt names the best by its step ("best_step") and is
always written first, so after a kill at any instant best.pt is either the
checkpoint last.pt names, or one improvement behind while last.pt is itself the
best; `check_run_checkpoints` tells the two apart and can finish such a save.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path
from typing import Any

import torch

from fastvae.train.models import VAE, VAEConfig, build_model
from fastvae.train.run_folder import RunFolderError, write_file

FORMAT_VERSION = 2  # 2: every checkpoint carries the sha256 of its content
LAST, BEST = "last", "best"
SUFFIX = ".pt"
REQUIRED_KEYS = (
    "config",
    "model_config",
    "model",
    "optimizer",
    "scaler",
    "rng",
    "epoch",
    "batch",
    "step",
    "best_val",
    "best_step",
    "history",
    "world_size",
    "sha256",
)


class CheckpointError(RunFolderError):
    """A checkpoint cannot be read, or is damaged or inconsistent; the message names the file and the fix."""


def checkpoint_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / f"{name}{SUFFIX}"


# ---------------------------------------------------------------------------
# The content digest
# ---------------------------------------------------------------------------
def content_digest(state: dict[str, Any]) -> str:
    """sha256 of everything in a checkpoint dict but its "sha256" entry.

    Computed from the values, not from torch.save's bytes, in a form a save/load
    round trip keeps: tensors by dtype, shape and raw bytes (wherever they live),
    lists and tuples alike (random.getstate() comes back with lists)."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in state.items() if key != "sha256"})
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(value.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}\n".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"list {len(value)}\n".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__} {value!r}\n".encode())
    else:
        raise TypeError(f"a checkpoint holds tensors, dicts, lists and plain scalars; got {type(value).__name__}")


# ---------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], *paths: Path) -> None:
    """Seal `state` with its digest and write the same bytes to each of `paths`, in order, each atomically.

    Raises RunFolderError naming the file that could not be written; the files before it are written."""
    sealed = {**state, "format_version": FORMAT_VERSION}
    sealed["sha256"] = content_digest(sealed)
    buffer = io.BytesIO()
    torch.save(sealed, buffer)
    for path in paths:
        write_file(path, buffer.getvalue())


def resolve_checkpoint(run_or_checkpoint: str | os.PathLike) -> Path:
    """A checkpoint file from a run folder (its last.pt) or a checkpoint path."""
    path = Path(run_or_checkpoint).expanduser()
    if path.is_dir():
        path = checkpoint_path(path, LAST)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass a run folder holding last.pt, or a .pt file")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` and check its format, its keys and its digest."""
    path = resolve_checkpoint(path)
    try:
        # weights_only stays True: the dict holds tensors, numbers, strings and RNG byte tensors only.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a damaged file
        # torch's own message is left out: for a file its safe loader refuses, it suggests the unsafe one.
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt, or it is not "
            f"a fastvae-train checkpoint (torch.load raised {type(error).__name__}). Use the "
            f"run's other checkpoint (best.pt / last.pt), a backup, or train again"
        ) from error
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a fastvae-train checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is a format-{state['format_version']} checkpoint; this fastvae-train "
            f"reads format {FORMAT_VERSION} (checkpoints that carry their own checksum). Use "
            f"the fastvae version that wrote it, or train again"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is not a complete fastvae-train checkpoint")
    if content_digest(state) != state["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its content does not match the sha256 it was "
            f"written with (bits changed on disk or in a copy). Use the run's other "
            f"checkpoint (best.pt / last.pt), a backup, or train again"
        )
    return state


def model_from_checkpoint(state: dict[str, Any], path: Path) -> VAE:
    """The model a checkpoint describes (on CPU), its weights loaded."""
    try:
        model = build_model(VAEConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {path} holds weights that do not fit its model_config "
            f"({error}); it is not a consistent fastvae-train checkpoint"
        ) from error
    return model


# ---------------------------------------------------------------------------
# last.pt and best.pt of a run folder
# ---------------------------------------------------------------------------
def check_run_checkpoints(run_dir: Path, repair: bool = False) -> dict[str, Any]:
    """last.pt of `run_dir`, after checking that best.pt is the checkpoint it names as the best.

    repair: finish a save that a kill stopped between last.pt and best.pt (last.pt is
    then itself the best) by rewriting best.pt from last.pt; without it, that case is
    an error too. Only the process that owns the folder may repair."""
    last_path, best_path = checkpoint_path(run_dir, LAST), checkpoint_path(run_dir, BEST)
    last = load_checkpoint(last_path)
    best_step = last["best_step"]
    found = load_checkpoint(best_path)["step"] if best_path.is_file() else None
    if found == best_step:
        return last
    if best_step == last["step"]:
        if repair:
            write_file(best_path, last_path.read_bytes())
            return last
        raise CheckpointError(
            f"{best_path} is not the run's best checkpoint: a save stopped between last.pt "
            f"and best.pt, and last.pt (step {best_step}) is the best. Resuming the run "
            f"repairs best.pt; until then use {last_path}"
        )
    held = "is missing" if found is None else f"holds step {found}"
    raise CheckpointError(
        f"{best_path} {held}, but {last_path} names step {best_step} as the best: best.pt "
        f"was replaced or deleted outside fastvae-train. Restore it from a backup, or use "
        f"last.pt"
    )


# ---------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------
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
