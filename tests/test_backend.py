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


def test_backward_runs_on_the_backend_its_forward_was_asked_for(monkeypatch):
    """use_backend() is thread-local, and autograd runs a CUDA graph's backward on a thread of its
    own: a backward run from a thread with no choice of its own (as there) still uses the
    forward's backend for its kernels."""
    generator = torch.Generator().manual_seed(7)
    mu = torch.randn(4, 3, generator=generator, requires_grad=True)
    logvar = torch.randn(4, 3, generator=generator, requires_grad=True)
    logits = torch.randn(2, 4, 5, generator=generator, requires_grad=True)
    x = torch.rand(4, 5, generator=generator)
    with fastvae.use_backend("torch"):
        z, kl = fastvae.reparameterize_kl(mu, logvar, samples=2, generator=torch.Generator().manual_seed(1))
        loss = fastvae.iwae_loss(logits, x, z, mu, logvar) + kl.sum()
    assert _backward_backends(monkeypatch, loss) == {"torch"}
    assert mu.grad is not None and torch.isfinite(mu.grad).all()


def _compiled_iwae_step():
    """A compiled forward of the sampler and the bound (custom op nodes, kept by aot_eager), its
    inputs, and a list that records every backend a kernel lookup resolves."""
    generator = torch.Generator().manual_seed(7)
    mu = torch.randn(4, 3, generator=generator, requires_grad=True)
    logvar = torch.randn(4, 3, generator=generator, requires_grad=True)
    logits = torch.randn(2, 4, 5, generator=generator, requires_grad=True)
    x = torch.rand(4, 5, generator=generator)

    def step(mu, logvar, logits, x):
        z, kl = fastvae.reparameterize_kl(mu, logvar, samples=2)
        return fastvae.iwae_loss(logits, x, z, mu, logvar) + kl.sum()

    torch._dynamo.reset()
    return torch.compile(step, backend="aot_eager", fullgraph=True), (mu, logvar, logits, x)


def _backward_backends(monkeypatch, loss) -> set[str]:
    """The backends a backward of `loss` resolves when run from a thread with no choice of its own."""
    import threading

    import fastvae.ops.registry as registry

    resolved: list[str] = []

    def recording(device):
        name = resolve_backend_name(device)
        resolved.append(name)
        return name

    monkeypatch.setattr(registry, "resolve_backend_name", recording)
    ran = threading.Thread(target=loss.backward)
    ran.start()
    ran.join()
    assert resolved, "the backward resolved no kernel: this test no longer sees what it checks"
    return set(resolved)


def test_compiling_under_use_backend_warns_that_the_compiled_backward_cannot_see_it(monkeypatch):
    """A compiled graph's backward picks its backend when it runs, where use_backend() may not be
    seen: recording an op under a choice that differs from the process-wide one says so, and how
    to fix it; the process-wide choice then holds in a backward on another thread."""
    import fastvae.backend as backend

    monkeypatch.setattr(backend, "_COMPILED_OVERRIDES_WARNED", set())
    auto_cpu = resolve_backend_name(torch.device("cpu"), "auto")
    other = "torch" if auto_cpu != "torch" else "native"
    if fastvae.available_backends()[other] is not None:
        pytest.skip(f"needs two CPU backends; {other}: {fastvae.available_backends()[other]}")
    compiled, inputs = _compiled_iwae_step()
    with pytest.warns(UserWarning, match=f"FASTVAE_BACKEND={other}"), fastvae.use_backend(other):
        loss = compiled(*inputs)
    assert _backward_backends(monkeypatch, loss) == {auto_cpu}  # what the warning said

    monkeypatch.setenv("FASTVAE_BACKEND", other)
    read_environment()
    try:
        compiled, inputs = _compiled_iwae_step()
        loss = compiled(*inputs)
        assert _backward_backends(monkeypatch, loss) == {other}
    finally:
        monkeypatch.delenv("FASTVAE_BACKEND")
        read_environment()


def test_process_backend_is_seen_by_every_thread_and_restored():
    """fastvae-train's --backend: the process-wide choice for a block, which autograd's and any
    other thread read (a thread's use_backend() still wins on that thread), then the one before."""
    import threading

    from fastvae.backend import process_backend

    before = requested_backend()
    seen: list[str] = []
    with process_backend("torch"):
        other = threading.Thread(target=lambda: seen.append(requested_backend()))
        other.start()
        other.join()
        assert requested_backend() == "torch"
        with fastvae.use_backend("native"):
            assert requested_backend() == "native"
    assert seen == ["torch"]
    assert requested_backend() == before
    with pytest.raises(ValueError, match="unknown fastvae backend"), process_backend("cuda"):
        pass
