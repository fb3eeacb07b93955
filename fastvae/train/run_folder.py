"""The run folder of fastvae-train: one writer at a time, files that are old or new but never torn,
and JSON that strict parsers read.

Every file the app writes goes through `write_file`: the bytes go to a temporary
`.<name>.tmp-<pid>` beside the target, are fsynced, renamed over the target, and
the folder is fsynced, so a kill at any instant leaves the old file or the new one.
A kill can leave the temporary file behind; `remove_stale_temp_files` deletes those
of processes that are gone.

One process at a time writes a run folder: `RunFolderLock` holds an flock on the
folder's lock file (which records the holder's pid) for as long as the run lives;
the kernel drops the lock when the process dies, however it dies.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
from pathlib import Path
from typing import Any

LOCK_NAME = ".fastvae-train.lock"
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)$")


class RunFolderError(RuntimeError):
    """The run folder or a file in it cannot be used; the message names the path and the fix."""


# ---------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------
def temp_path(path: Path) -> Path:
    """Where `write_file` stages `path` while this process writes it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (the rename lives in the folder's own data)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` with `data` (str is written as UTF-8) so that it is never seen half-written.

    Raises RunFolderError naming the file and saying whether the previous version survived; the
    temporary file is removed on every failure, a KeyboardInterrupt included."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    staged = temp_path(path)
    try:
        with open(staged, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
        _fsync_folder(path.parent)
    except OSError as error:
        staged.unlink(missing_ok=True)
        kept = f"the previous {path.name} is untouched" if path.exists() else f"no {path.name} was written"
        raise RunFolderError(f"could not write {path}: {_reason(error)}; {kept}. {_fix(error)}") from error
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _fix(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Free disk space, or write to another folder"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "Make the folder writable, or write to another folder"
    return "Check that the folder exists and is writable, or write to another folder"


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temporary files that killed writers left in `folder`.

    A temporary file of a live process other than this one is kept: a fastvae-eval
    may be writing its results beside a run. This process writes nothing while it
    cleans up, so its own pid on a leftover means an earlier process had that pid."""
    for path in Path(folder).iterdir():
        match = _TEMP_NAME.match(path.name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _process_alive(pid):
            path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# ---------------------------------------------------------------------------
# One writer per folder
# ---------------------------------------------------------------------------
class RunFolderLock:
    """An exclusive flock on `folder`/.fastvae-train.lock, held until `release()`.

    The lock file stays in the folder: deleting it would let a second process lock
    a new file while the first still holds the old one."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            raise RunFolderError(
                f"run folder {self.folder} is in use by another fastvae-train (pid {holder}). "
                f"Wait for it to finish, or stop it (kill {holder}) and continue the run with "
                f"--resume {self.folder}; or pass another --out"
            ) from None
        except OSError as error:
            self.release()
            raise RunFolderError(
                f"cannot lock run folder {self.folder} ({self.path.name}: {_reason(error)}). "
                f"Make the folder writable, or pass another --out"
            ) from error
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (closing the file drops the flock); safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------
def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """JSON that strict parsers accept: NaN and +-Infinity (not JSON) become null."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False)
