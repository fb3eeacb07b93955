"""torch.compile's CPU kernels compiled under one vector ISA must never run under another: with
isolate_inductor_cache, a process with ATEN_CPU_CAPABILITY=avx2 and a default one that share a
cache root both compute what eager PyTorch computes (without it, torch 2.14 hands the second
process the first one's kernel: a wrong loss, or heap corruption)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import json, torch, torch.nn.functional as F
from fastvae.train.inductor_cache import isolate_inductor_cache
folder = isolate_inductor_cache()
torch.manual_seed(0)
logits, target = torch.randn(128, 784), torch.rand(128, 784).round()
compiled = torch.compile(lambda l, x: F.binary_cross_entropy_with_logits(l, x, reduction="sum"))
print(json.dumps({"folder": folder, "compiled": float(compiled(logits, target)),
                  "eager": float(F.binary_cross_entropy_with_logits(logits, target, reduction="sum"))}))
"""


def _run(tmp_path, capability: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_CACHE_DIR")}
    env["TMPDIR"] = str(tmp_path)  # the default cache root lives in the temp folder
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="no vector ISA to switch")
def test_two_capabilities_sharing_a_cache_root_compute_the_eager_value(tmp_path):
    avx2 = _run(tmp_path, "avx2")
    default = _run(tmp_path, None)
    assert avx2["folder"] != default["folder"] or torch.backends.cpu.get_cpu_capability() == "AVX2"
    for result in (avx2, default):
        assert result["compiled"] == pytest.approx(result["eager"], rel=1e-5), result


def test_a_cache_folder_the_user_set_is_kept(monkeypatch):
    from fastvae.train.inductor_cache import isolate_inductor_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/mine")
    assert isolate_inductor_cache() == "/somewhere/mine"


def test_importing_fastvae_leaves_the_cache_folder_to_choose():
    """Importing torch._dynamo fixes TORCHINDUCTOR_CACHE_DIR to the shared default; fastvae must not
    do it at import, or isolate_inductor_cache (called after the import) would keep that folder."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    code = "import os, fastvae, fastvae.train; print(os.environ.get('TORCHINDUCTOR_CACHE_DIR'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "None", done.stdout
