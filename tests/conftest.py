"""Test setup: run the Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before fastvae.triton is imported (triton reads it
when a kernel is decorated), which is why it happens here, first.
Set FASTVAE_REQUIRE_BACKENDS=native,triton (as .ci/run does) to turn a backend
that cannot run into a failure instead of a skip.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastvae  # noqa: E402


def pytest_sessionstart(session):
    required = [n for n in os.environ.get("FASTVAE_REQUIRE_BACKENDS", "").split(",") if n]
    available = fastvae.available_backends()
    missing = {name: available.get(name, "unknown backend") for name in required if available.get(name, "x")}
    if missing:
        raise pytest.UsageError(f"FASTVAE_REQUIRE_BACKENDS asks for backends that cannot run: {missing}")


@pytest.fixture(autouse=True)
def _fresh_backend_state(monkeypatch):
    """Each test starts from FASTVAE_BACKEND unset so backend choice is explicit in the test."""
    monkeypatch.delenv("FASTVAE_BACKEND", raising=False)
    fastvae.backend.read_environment()
