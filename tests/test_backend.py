"""Backend choice: explicit, overridable, and loud when the choice cannot run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastvae
from fastvae.backend import BackendUnavailableError, read_environment, requested_backend, resolve_backend_name


def test_available_backends_names_every_backend_with_a_reason_or_none():
    available = fastvae.available_backends()
    assert set(available) == {"triton", "native", "torch"}
    assert available["torch"] is None
    for name, reason in available.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_context_manager_beats_environment(monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", "native")
    read_environment()
    assert requested_backend() == "native"
    with fastvae.use_backend("torch"):
        assert requested_backend() == "torch"
        with fastvae.use_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "torch"
    assert requested_backend() == "native"


def test_auto_on_cpu_is_native_when_built_else_torch_with_a_warning():
    native_reason = fastvae.available_backends()["native"]
    if native_reason is None:
        assert resolve_backend_name(torch.device("cpu")) == "native"
    else:
        code = (
            "import warnings, torch, fastvae\n"
            "from fastvae.backend import resolve_backend_name\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    print(resolve_backend_name(torch.device('cpu')), '|', w[0].message)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.startswith("torch |") and "native CPU kernels unavailable" in out


def test_triton_on_cpu_without_interpreter_raises_with_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastvae.use_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        fastvae.gaussian_kl(torch.randn(2, 3), torch.randn(2, 3))


def test_native_on_a_non_cpu_device_raises(monkeypatch):
    with fastvae.use_backend("native"), pytest.raises(BackendUnavailableError, match="native"):
        resolve_backend_name(torch.device("meta"))


def test_triton_on_an_unsupported_device_does_not_advise_what_is_already_set(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fastvae.use_backend("triton"), pytest.raises(BackendUnavailableError) as info:
        resolve_backend_name(torch.device("meta"))
    assert "meta" in str(info.value) and "set TRITON_INTERPRET=1" not in str(info.value)
