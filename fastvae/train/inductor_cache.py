"""One torch.compile cache per CPU vector ISA, so a kernel compiled for one is never run under another.

torch 2.14's inductor keys its on-disk cache of compiled CPU kernels without the vector ISA
the kernels were generated for, which ATEN_CPU_CAPABILITY changes (the benchmarks run torch's
AVX2 kernels on machines where its AVX-512 ones are slower). A kernel compiled in a process
with ATEN_CPU_CAPABILITY=avx2 and then loaded from the cache by a default (AVX-512) process
computes wrong values without an error (a compiled binary_cross_entropy_with_logits sum of
150217.6 where eager gives 80659.5) or corrupts the heap and aborts ("malloc(): unaligned
tcache chunk detected"). tests/test_inductor_cache.py reproduces both sides.

`isolate_inductor_cache` gives each capability a subfolder of the default cache; fastvae-train
and the benchmarks call it before they compile anything. A TORCHINDUCTOR_CACHE_DIR the user
set is left alone.
"""

from __future__ import annotations

import getpass
import os
import tempfile

import torch

ENV_VAR = "TORCHINDUCTOR_CACHE_DIR"


def _default_cache_dir() -> str:
    """Where inductor caches by default (its own rule: the temp folder, one cache per user)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")


def isolate_inductor_cache() -> str:
    """Point inductor at a cache of this process's CPU capability; returns the folder used."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    capability = torch.backends.cpu.get_cpu_capability().lower()
    os.environ[ENV_VAR] = os.path.join(_default_cache_dir(), f"cpu-{capability}")
    return os.environ[ENV_VAR]
