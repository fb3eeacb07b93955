"""The eager CPU routes written in C++: built against the running torch on first use, or not at all.

A plain eager call of a fused op runs a Python autograd.Function (fastvae.ops.common.FusedOp).
Inside a training step that Python runs with cold caches, and for the sampler it costs more than
the kernel: the call took about 205 µs in the step through Python and 130 µs through its C++ route
(`python -m benchmarks.sampler_in_step`, docs/design.md "The eager path"). An op family may
therefore ship `eager.cpp`, operators of the `fastvae_eager` library with a
torch::autograd::Function each, that compute what its Python route computes.

Unlike the native kernels (a C library with no torch headers, built once by `pip install`), these
link against libtorch, so they are built for the torch that runs them: with
torch.utils.cpp_extension, on first use, into ``$FASTVAE_EXTENSION_DIR`` (default
``~/.cache/fastvae/extensions``), one folder per torch version, reused afterwards. That needs a
C++ compiler, ninja and torch's headers (which torch's wheels ship). Where the build fails, fastvae
warns once, saying why and how to fix it, and the ops run through their Python route: the same
results, more host time per call. ``FASTVAE_EAGER_EXTENSION=0`` builds nothing and uses the
Python routes without a warning.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from fastvae.ops import library

ENV_SWITCH = "FASTVAE_EAGER_EXTENSION"
ENV_DIR = "FASTVAE_EXTENSION_DIR"
_OPS_FOLDER = Path(__file__).resolve().parent


def sources() -> list[Path]:
    """Every family's eager.cpp (fastvae/ops/<family>/eager.cpp), compiled into one library: found
    in the folders, as CMake finds kernels/*.cpp, so that no list can forget one."""
    return sorted(_OPS_FOLDER.glob("*/eager.cpp"))


def build_directory() -> Path:
    """Where the library for the running torch is built: one folder per torch version, so that a
    torch upgrade never loads a library built against another one's ABI."""
    root = os.environ.get(ENV_DIR) or Path.home() / ".cache" / "fastvae" / "extensions"
    return Path(root) / f"torch-{re.sub(r'[^0-9A-Za-z.]+', '_', torch.__version__)}"


def disabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip() == "0"


# Before torch 2.14, torch.utils.cpp_extension marks a build in progress by a lock file's existence
# (torch.utils.file_baton): a build killed midway leaves the file, and every later load waits on it
# forever. No build of these routes takes this long, so a lock this old is such a leftover.
STALE_LOCK_SECONDS = 600


def remove_a_stale_lock(folder: Path) -> None:
    """Remove folder's build lock when torch's builder waits on the file's mere existence and the file
    is older than STALE_LOCK_SECONDS, saying so. torch 2.14 and later hold an OS lock that dies with
    its holder instead: nothing is removed there."""
    from torch.utils import cpp_extension

    if not hasattr(cpp_extension, "FileBaton"):
        return
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(
            f"fastvae: removed {lock}, left {age / 60:.0f} minutes ago by a build of the eager C++ routes "
            "that did not finish; building them again",
            RuntimeWarning,
            stacklevel=7,  # the public function's caller, as _decide's warning
        )
        lock.unlink(missing_ok=True)


# torch.ops.fastvae_eager once built, loaded and bound: a process loads the library once (a second
# library registering the fastvae_eager operators would abort the process).
_loaded = None
# Why there is none: the build failed (warned then, not again in this process) or it is switched off.
_failure: str | None = None


_DECIDING = threading.Lock()  # two threads' first calls must not both build and load


def operators():
    """torch.ops.fastvae_eager, built and bound to the native library; None when switched off or when
    it cannot be built (warned once, with the reason and the fix). Decided on the first call: the
    switch is read then, not on every call of an op."""
    if _loaded is not None or _failure is not None:
        return _loaded
    with _DECIDING:
        return _decide()


def _decide():
    global _loaded, _failure
    if _loaded is not None or _failure is not None:  # another thread decided while this one waited
        return _loaded
    if disabled():
        _failure = f"switched off ({ENV_SWITCH}=0)"
        return None
    try:
        from torch.utils import cpp_extension

        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("fastvae_eager*.so")):
            print(
                f"fastvae: building the eager C++ routes for torch {torch.__version__} in {folder} "
                "(once per torch version, about half a minute)",
                file=sys.stderr,
                flush=True,
            )
        remove_a_stale_lock(folder)
        cpp_extension.load(
            name="fastvae_eager",
            sources=[str(path) for path in sources()],
            extra_cflags=["-O2"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
        torch.ops.fastvae_eager.bind(str(library.library_path()))
    except Exception as error:  # a missing compiler, ninja or header: say which, and go on in Python
        _failure = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"fastvae: the eager C++ routes could not be built ({_failure}); eager CPU calls of the native "
            f"backend run through Python instead, with the same results and more host time per call (about "
            f"75 µs per sampler call in a training step). To build them, install a C++ compiler and ninja "
            f"(`apt-get install g++ ninja-build`, or `pip install ninja`) and let ${ENV_DIR} (default "
            f"~/.cache/fastvae/extensions) be writable; to build nothing and silence this, set {ENV_SWITCH}=0.",
            RuntimeWarning,
            stacklevel=6,  # the public function's caller: _decide, operators, the route, FusedOp, the function
        )
        return None
    _loaded = torch.ops.fastvae_eager
    return _loaded
