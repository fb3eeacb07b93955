"""The native CPU library: finding `_native_cpu.so`, checking it, and calling its C functions.

The kernels in kernels/ are a plain C-ABI shared library (no libtorch or Python
headers) built by CMakeLists.txt and loaded here with ctypes. Each op family's
native.py declares the C functions it calls with their C prototypes, copied from
the definitions in kernels/<family>.cpp; `tests/test_native_abi.py` checks every
declared prototype against those definitions, so the two cannot drift apart.

Where the library is looked for, first match wins:
  1. ``$FASTVAE_NATIVE_LIB`` (a path to the file; nothing else is tried when set);
  2. the installed package, as the module ``fastvae._native_cpu`` (``pip install .``
     or ``pip install -e .``);
  3. ``build/_native_cpu.so`` of a standalone ``cmake -S . -B build && cmake --build build``
     in the checkout this package is imported from.

ctypes releases the GIL for the duration of each call; the kernels split rows over
`torch.get_num_threads()` OpenMP threads and sum each row in a fixed order, so
results do not depend on the thread count.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from fastvae.errors import BackendUnavailableError

ENV_LIB = "FASTVAE_NATIVE_LIB"
LIBRARY_MODULE = "fastvae._native_cpu"
ABI_VERSION = 6  # FASTVAE_ABI_VERSION in kernels/fastvae_native.h
_REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_HINT = (
    "build it with `pip install -e .` (or `pip install .`) in the fastvae checkout, or "
    "`cmake -S . -B build && cmake --build build` there, or set "
    f"{ENV_LIB}=/path/to/_native_cpu.so"
)

# dtype codes and status codes of kernels/fastvae_native.h
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
STATUS_OK, STATUS_BAD_DTYPE = 0, 1

# C parameter types -> ctypes; the only ones the ABI uses.
_CTYPES = {
    "int": ctypes.c_int,
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
    "double": ctypes.c_double,
    "const void*": ctypes.c_void_p,
    "void*": ctypes.c_void_p,
    "uint32_t*": ctypes.c_void_p,
}
_PROTOTYPE = re.compile(r"int\s+(fastvae_\w+)\s*\(([^)]*)\)")


def parse_prototypes(text: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """C prototypes `int fastvae_name(type name, ...)` in `text` -> {name: ((type, param), ...)}.

    Whitespace is normalized, so a prototype may span lines; `void` alone means no parameters."""
    out = {}
    for name, params in _PROTOTYPE.findall(text):
        params = " ".join(params.split())
        if params in ("", "void"):
            out[name] = ()
            continue
        pairs = []
        for param in params.split(","):
            ctype, _, pname = param.strip().rpartition(" ")
            if pname.startswith("*"):  # "const void *x" spelled with the star on the name
                ctype, pname = ctype + "*", pname[1:]
            pairs.append((" ".join(ctype.replace("*", " *").split()).replace(" *", "*"), pname))
        out[name] = tuple(pairs)
    return out


# Every C function some family declared: name -> ((type, param), ...).
DECLARED: dict[str, tuple[tuple[str, str], ...]] = {}


def declare(prototypes: str) -> None:
    """Declare C functions the caller will `call`, by their C prototypes (as in kernels/*.cpp)."""
    parsed = parse_prototypes(prototypes)
    if not parsed:
        raise ValueError(f"no C prototype found in {prototypes!r}")
    for name, params in parsed.items():
        for ctype, pname in params:
            if ctype not in _CTYPES:
                raise ValueError(f"{name}: parameter {pname} has type {ctype!r}, which the native ABI does not use")
        DECLARED[name] = params


declare("""
int fastvae_abi_version(void);
int fastvae_has_openmp(void);
int fastvae_philox_version(void);
int fastvae_philox_words(int version, uint64_t seed, uint64_t g0, uint32_t* words);
""")


# ---------------------------------------------------------------------------
# Finding and loading the library
# ---------------------------------------------------------------------------
def _find_library() -> tuple[Path | None, str]:
    """The library path to load, or None and a description of where it was looked for."""
    env = os.environ.get(ENV_LIB)
    if env:
        return Path(env), f"${ENV_LIB}={env}"
    looked = []
    spec = importlib.util.find_spec(LIBRARY_MODULE)
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        return Path(spec.origin), spec.origin
    looked.append(f"the installed module {LIBRARY_MODULE}")
    if (_REPO_ROOT / "CMakeLists.txt").is_file():
        built = _REPO_ROOT / "build" / "_native_cpu.so"
        if built.is_file():
            return built, str(built)
        looked.append(str(built))
    return None, ", ".join(looked)


def _bind(lib: ctypes.CDLL, path: Path, name: str) -> None:
    try:
        function = getattr(lib, name)
    except AttributeError as error:
        raise OSError(f"{path} has no function {name}: the library is stale or not fastvae's") from error
    function.argtypes = [_CTYPES[ctype] for ctype, _ in DECLARED[name]]
    function.restype = ctypes.c_int


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, Path | None, str | None]:
    """(library, its path, None) once loaded, or (None, path or None, the reason with the fix)."""
    path, where = _find_library()
    if path is None:
        return None, None, f"the native CPU library _native_cpu.so was not found (looked in {where}); {BUILD_HINT}"
    try:
        if not path.is_file():
            raise OSError(f"{path} does not exist")
        lib = ctypes.CDLL(str(path))
        _bind(lib, path, "fastvae_abi_version")
        version = lib.fastvae_abi_version()
        if version != ABI_VERSION:
            raise OSError(
                f"{path} has ABI version {version} but this fastvae expects {ABI_VERSION}; the library is stale"
            )
    except OSError as error:
        return None, path, f"could not load the native CPU library from {where}: {error}; {BUILD_HINT}"
    return lib, path, None


def load_error() -> str | None:
    """None when the native library is loaded, else why not and how to fix it."""
    return _load()[2]


def library_path() -> Path | None:
    """Where the loaded (or failing) library is, None if none was found."""
    return _load()[1]


def _lib() -> ctypes.CDLL:
    lib, _, reason = _load()
    if lib is None:
        raise BackendUnavailableError(f"fastvae backend 'native' is unavailable: {reason}")
    return lib


@functools.cache
def function(name: str):
    """The bound C function `name` (declared with `declare`); raises if the library cannot run it."""
    lib = _lib()
    if name not in DECLARED:
        raise KeyError(f"{name} was never declared with fastvae.ops.library.declare")
    try:
        _bind(lib, library_path(), name)
    except OSError as error:
        raise BackendUnavailableError(f"fastvae backend 'native' is unavailable: {error}; {BUILD_HINT}") from error
    return getattr(lib, name)


def call(name: str, *args) -> None:
    """Call C function `name`; a non-zero status becomes a Python error."""
    status = function(name)(*args)  # functools.cache: one C-level dict lookup after the first call
    if status != STATUS_OK:
        if status == STATUS_BAD_DTYPE:
            raise TypeError(f"native backend: {name} does not support this dtype combination")
        raise RuntimeError(f"native backend: {name} failed with status {status}")


def has_openmp() -> bool:
    """Whether the loaded library splits rows across threads (built with OpenMP)."""
    return bool(function("fastvae_has_openmp")())


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------
def check_rows(name: str, t: Tensor, shape: torch.Size | None = None) -> Tensor:
    """t as a CPU float [B, N] with unit column stride (a copy only when it had none)."""
    # is_cpu, not device.type: no torch.device object built on every call
    if not t.is_cpu or t.dim() != 2 or t.dtype not in DTYPE_CODES or (shape is not None and t.shape != shape):
        _reject_rows(name, t, shape)
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _reject_rows(name: str, t: Tensor, shape: torch.Size | None) -> None:
    """Why check_rows refuses t, as the error a caller can act on."""
    if t.device.type != "cpu":
        raise ValueError(
            f"native backend: {name} is on {t.device}; the native kernels take CPU tensors "
            f"(use backend 'triton' or 'torch' for other devices)"
        )
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"native backend: {name} has dtype {t.dtype}; use float32, float64, bfloat16 or float16")
    if t.dim() != 2:
        raise ValueError(f"native backend: {name} must be a 2-D row view [B, N], got shape {list(t.shape)}")
    raise ValueError(f"native backend: {name} {list(t.shape)} must have the shape {list(shape)} of the first input")


def check_periodic_rows(name: str, t: Tensor, rows_of: Tensor) -> Tensor:
    """t as check_rows gives it, with the columns of `rows_of` (a checked [R, N]) and a row count T
    that divides R: row r of rows_of pairs with row r % T of t (a row-periodic input, e.g. the
    data [B, N] scored against K samples' logits [K * B, N])."""
    t = check_rows(name, t)
    rows, cols = rows_of.shape
    if t.shape[1] != cols or (t.shape[0] == 0 and rows != 0) or (t.shape[0] and rows % t.shape[0]):
        raise ValueError(
            f"native backend: {name} {list(t.shape)} must have {cols} columns and a row count "
            f"that divides {rows} (row r is read as row r % {name} rows)"
        )
    return t


def pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def row_stride(t: Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def seed_value(seed: Tensor) -> int:
    """The seed a CPU kernel takes: the 0-d int64 CPU tensor's value (no device sync on the CPU)."""
    if not seed.is_cpu:
        raise ValueError(f"native backend: the seed is on {seed.device}; the native kernels take CPU tensors")
    value = int(seed)
    if value < 0:
        raise ValueError(f"native backend: seed {value} must be >= 0 (fastvae draws seeds in [0, 2**62))")
    return value


def num_threads() -> int:
    return torch.get_num_threads()


def call_logits_likelihood(
    name: str, logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool, weight: float, compute
) -> tuple[Tensor, Tensor | None]:
    """Run `name`, a likelihood-from-logits kernel with the C signature the Bernoulli's and the
    continuous Bernoulli's share, on row views logits [B, D] and target [T, D] already in the dtypes
    it reads; log p comes back in `compute`, the gradient in logits' dtype (or None)."""
    rows, cols = logits.shape
    logp = torch.empty((rows, cols) if elementwise else (rows,), dtype=compute)
    grad = torch.empty((rows, cols), dtype=logits.dtype) if compute_grad else None
    call(
        name,
        DTYPE_CODES[logits.dtype],
        DTYPE_CODES[target.dtype],
        rows,
        cols,
        logits.data_ptr(),
        logits.stride(0),
        target.data_ptr(),
        target.stride(0),
        target.shape[0],
        int(bool(elementwise)),
        logp.data_ptr(),
        pointer(grad),
        float(weight),
        num_threads(),
    )
    return logp, grad
