"""The `native` backend: C++ CPU kernels from kernels/, loaded with ctypes.

The kernels are a plain C-ABI shared library (`_native_cpu.so`, no libtorch
headers) built by CMakeLists.txt. This module finds it, checks its ABI version,
and implements the backend contract of `fastvae.backend` on top of it: inputs
are 2-D row views `[B, N]` passed by pointer with their row stride (no copy),
outputs are allocated here with torch and filled by C++. ctypes releases the
GIL for the duration of each call; the kernels split rows over
`torch.get_num_threads()` OpenMP threads and sum each row in a fixed order, so
results do not depend on the thread count.

Where the library is looked for, first match wins:
  1. ``$FASTVAE_NATIVE_LIB`` (a path to the file; nothing else is tried when set);
  2. the installed package, as the module ``fastvae._native_cpu`` (``pip install .``
     or ``pip install -e .``);
  3. ``build/_native_cpu.so`` of a standalone ``cmake -S . -B build && cmake --build build``
     in the checkout this package is imported from.

Dtypes: float32, bfloat16 and float16 are computed in float32 and float64 in
float64. Logits and target of the Bernoulli kernel may differ in dtype. The
Gaussian kernels take one storage dtype: when mu, logvar (eps, grad_z) differ,
they are upcast to the compute dtype first. That costs a copy, but such mixes are
rare (mu and logvar are two halves of one encoder output), the math is the same
(it runs in the compute dtype anyway), and it saves compiling every dtype triple.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor

from fastvae.errors import BackendUnavailableError

ENV_LIB = "FASTVAE_NATIVE_LIB"
LIBRARY_MODULE = "fastvae._native_cpu"
ABI_VERSION = 4  # FASTVAE_ABI_VERSION in kernels/fastvae_native.h
_REPO_ROOT = Path(__file__).resolve().parent.parent
_BUILD_HINT = ("build it with `pip install -e .` (or `pip install .`) in the fastvae checkout, or "
               "`cmake -S . -B build && cmake --build build` there, or set "
               f"{ENV_LIB}=/path/to/_native_cpu.so")

# dtype codes of kernels/fastvae_native.h
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_ERR_DTYPE = 1

_i64, _u64, _int, _ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "fastvae_abi_version": [],
    "fastvae_has_openmp": [],
    "fastvae_reparameterize_kl_forward":
        [_int, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _u64, _ptr, _ptr, _int],
    "fastvae_reparameterize_kl_backward":
        [_int, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _u64, _ptr, _ptr, _int],
    "fastvae_gaussian_kl_forward": [_int, _i64, _i64, _ptr, _i64, _ptr, _i64, _int, _ptr, _ptr, _ptr, _int],
    "fastvae_bernoulli_log_likelihood_forward":
        [_int, _int, _i64, _i64, _ptr, _i64, _ptr, _i64, _int, _ptr, _ptr, ctypes.c_double, _int],
    "fastvae_philox_version": [],
    "fastvae_philox_words": [_int, _u64, _u64, _ptr],
}


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


def _open(path: Path) -> ctypes.CDLL:
    """Load the library at `path` and declare its functions; raises OSError with the cause."""
    if not path.is_file():
        raise OSError(f"{path} does not exist")
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        try:
            function = getattr(lib, name)
        except AttributeError as error:
            raise OSError(f"{path} is not the fastvae native library (no symbol {name})") from error
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    version = lib.fastvae_abi_version()
    if version != ABI_VERSION:
        raise OSError(f"{path} has ABI version {version} but this fastvae expects {ABI_VERSION}; "
                      f"the library is stale")
    return lib


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, Path | None, str | None]:
    """(library, its path, None) once loaded, or (None, path or None, the reason with the fix)."""
    path, where = _find_library()
    if path is None:
        return None, None, f"the native CPU library _native_cpu.so was not found (looked in {where}); {_BUILD_HINT}"
    try:
        return _open(path), path, None
    except OSError as error:
        return None, path, f"could not load the native CPU library from {where}: {error}; {_BUILD_HINT}"


def load_error() -> str | None:
    """None when the native library is loaded, else why not and how to fix it."""
    return _load()[2]


def library_path() -> Path | None:
    """Where the loaded (or failing) library is, None if none was found."""
    return _load()[1]


def has_openmp() -> bool:
    """Whether the loaded library splits rows across threads (built with OpenMP)."""
    return bool(_lib().fastvae_has_openmp())


def _lib() -> ctypes.CDLL:
    lib, _, reason = _load()
    if lib is None:
        raise BackendUnavailableError(f"fastvae backend 'native' is unavailable: {reason}")
    return lib


# ---------------------------------------------------------------------------
# Argument checks and dtype plumbing
# ---------------------------------------------------------------------------
def _check_rows(name: str, t: Tensor, shape: torch.Size | None = None) -> Tensor:
    """t as a CPU float [B, N] with unit column stride (a copy only when it had none)."""
    if t.device.type != "cpu":
        raise ValueError(f"native backend: {name} is on {t.device}; the native kernels take CPU tensors "
                         f"(use backend 'triton' or 'torch' for other devices)")
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"native backend: {name} has dtype {t.dtype}; use float32, float64, bfloat16 "
                        f"or float16")
    if t.dim() != 2:
        raise ValueError(f"native backend: {name} must be a 2-D row view [B, N], got shape {list(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"native backend: {name} {list(t.shape)} must have the shape {list(shape)} "
                         f"of the first input")
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


def _compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """float64 when either input is float64, else float32 (the dtype the math runs in)."""
    return torch.float64 if a.dtype == torch.float64 or b.dtype == torch.float64 else torch.float32


def _storage_dtype(compute: torch.dtype, *tensors: Tensor | None) -> torch.dtype:
    """The one dtype the Gaussian kernels read: the inputs' own if they agree, else `compute`."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None and t.dtype != dtype:
            return compute
    return dtype


def _as_dtype(dtype: torch.dtype, t: Tensor | None) -> Tensor | None:
    """t in dtype: itself when it already is (a dtype compare costs far less than a no-op .to())."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"native backend: seed {seed} must be in [0, 2**64) (fastvae draws seeds in [0, 2**62))")
    return seed


def _call(function, *args) -> None:
    status = function(*args)
    if status == _ERR_DTYPE:
        raise TypeError(f"native backend: {function.__name__} does not support this dtype combination")
    if status != 0:
        raise RuntimeError(f"native backend: {function.__name__} failed with status {status}")


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stride(t: Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


# ---------------------------------------------------------------------------
# Backend contract (see fastvae.backend)
# ---------------------------------------------------------------------------
def reparameterize_kl_forward(mu: Tensor, logvar: Tensor, eps: Tensor | None,
                              seed: int) -> tuple[Tensor, Tensor]:
    """mu, logvar, eps (or None: Philox noise from seed) [B, L] -> z [B, L] (mu's dtype), kl [B]."""
    lib = _lib()
    mu = _check_rows("mu", mu)
    logvar = _check_rows("logvar", logvar, mu.shape)
    eps = None if eps is None else _check_rows("eps", eps, mu.shape)
    compute = _compute_dtype(mu, logvar)
    dtype = _storage_dtype(compute, mu, logvar, eps)
    m, lv, e = _as_dtype(dtype, mu), _as_dtype(dtype, logvar), _as_dtype(dtype, eps)
    rows, cols = mu.shape
    z = torch.empty((rows, cols), dtype=dtype)
    kl = torch.empty(rows, dtype=compute)
    _call(lib.fastvae_reparameterize_kl_forward, _DTYPE_CODES[dtype], rows, cols,
          m.data_ptr(), m.stride(0), lv.data_ptr(), lv.stride(0), _pointer(e), _stride(e),
          _check_seed(seed), z.data_ptr(), kl.data_ptr(), torch.get_num_threads())
    return _as_dtype(mu.dtype, z), kl


def reparameterize_kl_backward(grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor,
                               logvar: Tensor, eps: Tensor | None,
                               seed: int) -> tuple[Tensor, Tensor]:
    """grad_z [B, L] | None, grad_kl [B] | None -> grad_mu, grad_logvar [B, L] (mu's, logvar's dtype).

    eps None regenerates the forward noise from seed."""
    lib = _lib()
    mu = _check_rows("mu", mu)
    logvar = _check_rows("logvar", logvar, mu.shape)
    eps = None if eps is None else _check_rows("eps", eps, mu.shape)
    grad_z = None if grad_z is None else _check_rows("grad_z", grad_z, mu.shape)
    compute = _compute_dtype(mu, logvar)
    if grad_kl is not None:
        if grad_kl.shape != mu.shape[:1]:
            raise ValueError(f"native backend: grad_kl {list(grad_kl.shape)} must have shape [{mu.shape[0]}]")
        if grad_kl.dtype != compute or grad_kl.device.type != "cpu":
            grad_kl = grad_kl.to(device="cpu", dtype=compute)  # [B]: a negligible copy
        # Any element stride, 0 included: the backward of kl.sum() hands over one value expanded.
    dtype = _storage_dtype(compute, mu, logvar, eps, grad_z)
    m, lv, e, gz = _as_dtype(dtype, mu), _as_dtype(dtype, logvar), _as_dtype(dtype, eps), _as_dtype(dtype, grad_z)
    rows, cols = mu.shape
    grad_mu = torch.empty((rows, cols), dtype=dtype)
    grad_logvar = torch.empty((rows, cols), dtype=dtype)
    _call(lib.fastvae_reparameterize_kl_backward, _DTYPE_CODES[dtype], rows, cols,
          _pointer(gz), _stride(gz), _pointer(grad_kl), _stride(grad_kl), m.data_ptr(), m.stride(0),
          lv.data_ptr(), lv.stride(0), _pointer(e), _stride(e), _check_seed(seed),
          grad_mu.data_ptr(), grad_logvar.data_ptr(), torch.get_num_threads())
    return _as_dtype(mu.dtype, grad_mu), _as_dtype(logvar.dtype, grad_logvar)


def gaussian_kl_forward(mu: Tensor, logvar: Tensor, elementwise: bool,
                        compute_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """mu, logvar [B, L] -> kl ([B, L] if elementwise else [B]), dkl/dmu, dkl/dlogvar (or None)."""
    lib = _lib()
    mu = _check_rows("mu", mu)
    logvar = _check_rows("logvar", logvar, mu.shape)
    compute = _compute_dtype(mu, logvar)
    dtype = _storage_dtype(compute, mu, logvar)
    m, lv = _as_dtype(dtype, mu), _as_dtype(dtype, logvar)
    rows, cols = mu.shape
    kl = torch.empty((rows, cols) if elementwise else (rows,), dtype=compute)
    grad_mu = torch.empty((rows, cols), dtype=dtype) if compute_grad else None
    grad_logvar = torch.empty((rows, cols), dtype=dtype) if compute_grad else None
    _call(lib.fastvae_gaussian_kl_forward, _DTYPE_CODES[dtype], rows, cols,
          m.data_ptr(), m.stride(0), lv.data_ptr(), lv.stride(0), int(bool(elementwise)),
          kl.data_ptr(), _pointer(grad_mu), _pointer(grad_logvar), torch.get_num_threads())
    if not compute_grad:
        return kl, None, None
    return kl, _as_dtype(mu.dtype, grad_mu), _as_dtype(logvar.dtype, grad_logvar)


def bernoulli_log_likelihood_forward(logits: Tensor, target: Tensor, elementwise: bool, compute_grad: bool,
                                     grad_scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """logits, target [B, D] -> log p ([B, D] if elementwise else [B]), grad_scale * dlogp/dlogits (or None).

    Any mix of float32/bfloat16/float16 runs without a copy; float64 with another
    dtype is upcast to float64, where the math then runs."""
    lib = _lib()
    logits = _check_rows("logits", logits)
    target = _check_rows("target", target, logits.shape)
    compute = _compute_dtype(logits, target)
    l, x = (logits.to(compute), target.to(compute)) if compute == torch.float64 else (logits, target)
    rows, cols = logits.shape
    logp = torch.empty((rows, cols) if elementwise else (rows,), dtype=compute)
    grad = torch.empty((rows, cols), dtype=l.dtype) if compute_grad else None
    _call(lib.fastvae_bernoulli_log_likelihood_forward, _DTYPE_CODES[l.dtype], _DTYPE_CODES[x.dtype],
          rows, cols, l.data_ptr(), l.stride(0), x.data_ptr(), x.stride(0), int(bool(elementwise)),
          logp.data_ptr(), _pointer(grad), float(grad_scale), torch.get_num_threads())
    return logp, None if grad is None else _as_dtype(logits.dtype, grad)
