"""Which implementation runs an op: one explicit choice, never a silent fallback.

Backends
--------
``triton``  fused Triton kernels; CUDA tensors, or CPU tensors when the environment
            sets ``TRITON_INTERPRET=1`` (how CI tests them).
``native``  C++ CPU kernels from ``kernels/``, built by CMake; CPU tensors.
``torch``   the pure-PyTorch reference of each op family; any device.

``auto`` (the default) picks triton on CUDA and native on CPU. When the native library
is missing on CPU, auto uses torch and warns once, naming the reason; asking for a
backend by name that cannot run raises :class:`BackendUnavailableError` with the reason
and the fix.

Choose with ``FASTVAE_BACKEND=auto|triton|native|torch`` or, for a block of code,
``with fastvae.use_backend("torch"): ...`` (the context manager wins). The variable is read
once, when fastvae is imported: every op call consults the choice, and reading the
environment on each call cost more than a small CPU kernel (see `read_environment`). What
each backend implements is listed in `fastvae.ops.registry`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator

import torch

from fastvae.errors import BackendUnavailableError
from fastvae.ops import library

BACKENDS = ("triton", "native", "torch")
BACKEND_CHOICES = ("auto",) + BACKENDS
ENV_VAR = "FASTVAE_BACKEND"

_override = threading.local()
# FASTVAE_BACKEND as read_environment found it: a choice, or the error an unknown value raises.
_environment_choice = "auto"
_environment_error: str | None = None
# What "auto" resolves to on the CPU once decided: whether the native library loaded does not
# change within a process.
_auto_cpu_backend: str | None = None


def _check_name(name: str) -> str:
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown fastvae backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return name


def read_environment() -> None:
    """Read FASTVAE_BACKEND (again). fastvae reads it when imported; a process that changes the
    variable later calls this, or, better, chooses with `use_backend`."""
    global _environment_choice, _environment_error
    raw = os.environ.get(ENV_VAR)
    env = (raw or "").strip().lower() or "auto"
    valid = env in BACKEND_CHOICES
    _environment_choice = env if valid else "auto"
    _environment_error = (
        None if valid else f"{ENV_VAR}={raw!r} is not a fastvae backend; set it to one of {', '.join(BACKEND_CHOICES)}"
    )


def requested_backend() -> str:
    """The backend the user asked for: use_backend() if active, else $FASTVAE_BACKEND, else auto."""
    override = getattr(_override, "name", None)
    if override is not None:
        return override
    if _environment_error is not None:
        raise ValueError(_environment_error)
    return _environment_choice


read_environment()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fastvae ops in this block on backend `name` (auto, triton, native or torch).

    The choice is this thread's. The backward of an op called in the block runs on the same
    backend wherever it runs; compiled code chooses when it runs, so for it set FASTVAE_BACKEND
    instead (torch.compile under a differing choice warns).

    Example:
        >>> with fastvae.use_backend("torch"):      # the reference, for a block
        ...     loss = fastvae.elbo_loss(logits, x, mu, logvar)
    """
    _check_name(name)
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


@contextlib.contextmanager
def process_backend(name: str) -> Iterator[None]:
    """In this block the process-wide choice (what FASTVAE_BACKEND sets) is `name`, seen by every
    thread: autograd's backward threads and compiled code included, which a thread's
    use_backend() is not (see warn_if_compiled_backward_loses_the_block). For a program that owns
    its process, as fastvae-train's --backend; a library's caller uses use_backend()."""
    global _environment_choice, _environment_error
    _check_name(name)
    previous = _environment_choice, _environment_error
    _environment_choice, _environment_error = name, None
    try:
        yield
    finally:
        _environment_choice, _environment_error = previous


def _triton_reason(device: torch.device | None) -> str | None:
    """Why triton cannot run on `device` (None: any device it could), or None if it can."""
    try:
        import triton  # noqa: F401  (an optional dependency: probing is the point)
    except ImportError as error:
        return f"triton is not installed ({error}); install it with `pip install triton` (Linux)"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device is None:
        if torch.cuda.is_available() or interpret:
            return None
        return "no CUDA device, and TRITON_INTERPRET=1 is not set (it runs the kernels on CPU, slowly)"
    if device.type == "cuda" or (device.type == "cpu" and interpret):
        return None
    if interpret:
        return f"triton runs on CUDA tensors (or CPU tensors in the interpreter), not {device.type}; move them"
    return (
        f"triton runs on CUDA tensors, not {device.type}; move the tensors to CUDA, or set "
        f"TRITON_INTERPRET=1 before importing fastvae to interpret the kernels on CPU"
    )


def _native_reason(device: torch.device | None) -> str | None:
    reason = library.load_error()
    if reason is not None:
        return reason
    if device is not None and device.type != "cpu":
        return f"native kernels run on CPU tensors, not {device.type}; use backend triton or torch there"
    return None


def unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """Why backend `name` cannot run on `device` (any device when None), or None if it can."""
    _check_name(name)
    if name == "triton":
        return _triton_reason(device)
    if name == "native":
        return _native_reason(device)
    return None


def available_backends() -> dict[str, str | None]:
    """Each backend mapped to None if it can run here, or to the reason it cannot.

    Example:
        >>> fastvae.available_backends()
        {'triton': 'no CUDA device, and TRITON_INTERPRET=1 is not set (...)', 'native': None, 'torch': None}
    """
    return {name: unavailable_reason(name) for name in BACKENDS}


def resolve_backend_name(device: torch.device, name: str | None = None) -> str:
    """The backend that runs ops on `device` now (or that `name`, a choice, runs them on); raises
    if it cannot."""
    name = requested_backend() if name is None else name
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu":
            return _auto_cpu_backend or _resolve_auto_cpu()
        return "torch"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"fastvae backend {name!r} cannot run on {device}: {reason}")
    return name


def cpu_backend_name() -> str:
    """The backend CPU tensors' ops are asked to run on now: auto's choice for the CPU or the name
    chosen, not checked (resolve_backend_name raises for one that cannot run). Cheaper than
    resolve_backend_name for a caller that already knows its tensors are on the CPU: no device
    object is read."""
    name = requested_backend()
    return (_auto_cpu_backend or _resolve_auto_cpu()) if name == "auto" else name


_COMPILED_OVERRIDES_WARNED: set[tuple[str, str]] = set()


def warn_if_compiled_backward_loses_the_block(op: str, device: torch.device) -> None:
    """Called as torch.compile records a fastvae op: a compiled graph picks its kernels' backend
    when it runs, and its backward runs where use_backend() is not seen (on CUDA, autograd's own
    thread; anywhere, after the block). Warn once when that would be another backend, with the
    process-wide choice that covers both."""
    chosen = getattr(_override, "name", None)
    if chosen is None or _environment_error is not None:
        return
    try:
        elsewhere = resolve_backend_name(device, _environment_choice)
        here = resolve_backend_name(device, chosen)
    except BackendUnavailableError:
        return  # the op says so itself, with the fix, when it runs
    if here == elsewhere or (here, elsewhere) in _COMPILED_OVERRIDES_WARNED:
        return
    _COMPILED_OVERRIDES_WARNED.add((here, elsewhere))
    warnings.warn(
        f"fastvae: torch.compile recorded {op} under use_backend({chosen!r}), but a compiled "
        f"backward chooses its backend when it runs, and there the block may not be seen (after "
        f"it, or on CUDA, where autograd runs the backward on a thread of its own): it would "
        f"then use {elsewhere!r}. For {here!r} in forward and backward of compiled code, set "
        f"{ENV_VAR}={here} for the process (then call fastvae.backend.read_environment() if "
        f"fastvae is already imported).",
        stacklevel=2,
    )


def _resolve_auto_cpu() -> str:
    """native when its library loads, else torch with a warning (once); remembered."""
    global _auto_cpu_backend
    reason = _native_reason(torch.device("cpu"))
    if reason is not None:
        warnings.warn(
            f"fastvae: native CPU kernels unavailable ({reason}); using the torch "
            f"reference backend. Set {ENV_VAR}=torch to silence this.",
            stacklevel=4,
        )
    _auto_cpu_backend = "native" if reason is None else "torch"
    return _auto_cpu_backend
