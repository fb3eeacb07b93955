"""The eager C++ routes (fastvae.ops.eager_extension): what they compute is the Python route's, bit
for bit; which calls take them; and what happens where they cannot be built.

The Python route these compare against is itself checked against the float64 oracle in
test_ops.py; second derivatives through the C++ route are checked numerically here."""

import os
import re
import time

import pytest
import torch

import fastvae
from fastvae.ops import eager_extension, library
from fastvae.ops.gaussian.op import reparameterize_kl_fused

from helpers import needs_library

pytestmark = [
    needs_library,
    pytest.mark.skipif(eager_extension.disabled(), reason=f"{eager_extension.ENV_SWITCH}=0"),
]


@pytest.fixture(scope="module", autouse=True)
def _built():
    """A route that cannot be built here skips these tests, saying why; where the native backend is
    required (FASTVAE_REQUIRE_BACKENDS, as CI sets it) it fails them: the route is part of it."""
    if eager_extension.operators() is None:
        why = f"the eager C++ routes could not be built: {eager_extension._failure}"
        if "native" in os.environ.get("FASTVAE_REQUIRE_BACKENDS", "").split(","):
            pytest.fail(why)
        pytest.skip(why)


def _is_cpp_route(t: torch.Tensor) -> bool:
    return "Sampler" in t.grad_fn.name()


def _python_route(mu, logvar, eps, seed, samples):
    return reparameterize_kl_fused._function.apply(mu, logvar, eps, seed, samples)


def _cpp_route(mu, logvar, eps, seed, samples):
    outputs = reparameterize_kl_fused.eager_route(mu, logvar, eps, seed, samples)
    assert outputs is not None, "the C++ route refused a call it takes"
    return outputs


def _encoder_rows(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and logvar as models hand them over: contiguous, strided halves of one output, [B, C, L],
    columns with a stride (a transposed layout, copied to rows), and no rows at all."""
    if kind == "contiguous":
        pair = torch.randn(6, 4), torch.randn(6, 4)
    elif kind == "halves":
        pair = torch.randn(6, 10).chunk(2, dim=1)
    elif kind == "3d":
        pair = torch.randn(6, 2, 3), torch.randn(6, 2, 3)
    elif kind == "transposed":
        pair = torch.randn(4, 6).t(), torch.randn(4, 6).t()
    else:
        pair = torch.randn(0, 4), torch.randn(0, 4)
    return tuple(t.to(dtype).requires_grad_() for t in pair)


def _run(route, mu, logvar, seed, samples, used: str, torch_seed: int = 3):
    """Outputs and input gradients of one call, the upstream gradients drawn after it."""
    mu, logvar = (t.detach().clone().requires_grad_() for t in (mu, logvar))
    torch.manual_seed(torch_seed)
    z, kl, seed_used = route(mu, logvar, None, seed, samples)
    outputs, upstream = [], []
    if used in ("z", "both"):
        outputs.append(z)
        upstream.append(torch.randn_like(z))
    if used in ("kl", "both"):
        outputs.append(kl)
        upstream.append(torch.randn_like(kl))
    if mu.numel():
        torch.autograd.backward(outputs, upstream)
    return z, kl, seed_used, mu.grad, logvar.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["contiguous", "halves", "3d", "transposed", "empty"])
@pytest.mark.parametrize("samples", [None, 3])
@pytest.mark.parametrize("used", ["both", "z", "kl"])
def test_the_cpp_route_computes_what_the_python_route_does(dtype, kind, samples, used):
    mu, logvar = _encoder_rows(kind, dtype)
    with fastvae.use_backend("native"):
        cpp = _run(_cpp_route, mu, logvar, None, samples, used)
        python = _run(_python_route, mu, logvar, None, samples, used)
    if mu.numel():
        assert _is_cpp_route(cpp[0]) and not _is_cpp_route(python[0])
    for name, got, want in zip(("z", "kl", "seed", "grad mu", "grad logvar"), cpp, python):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape, want.shape)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_a_given_seed_is_used_as_given():
    """A generator's seed (fastvae.reparameterize_kl(generator=...)) reaches the kernel unchanged."""
    mu, logvar = _encoder_rows("halves", torch.float32)
    seed = torch.tensor(2**61 + 12345)
    with fastvae.use_backend("native"):
        cpp = _run(_cpp_route, mu, logvar, seed, None, "both")
        python = _run(_python_route, mu, logvar, seed, None, "both")
    assert int(cpp[2]) == 2**61 + 12345
    for got, want in zip(cpp, python):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_public_calls_take_the_cpp_route_only_where_it_computes_the_same():
    mu, logvar = _encoder_rows("halves", torch.float32)
    with fastvae.use_backend("native"):
        assert _is_cpp_route(fastvae.reparameterize_kl(mu, logvar)[0])
        assert _is_cpp_route(fastvae.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(1))[0])
        # eps given, or mu and logvar in two dtypes: the Python route
        assert not _is_cpp_route(fastvae.reparameterize_kl(mu, logvar, torch.randn(6, 5))[0])
        assert not _is_cpp_route(fastvae.reparameterize_kl(mu, logvar.double())[0])
    for backend in ("torch", "triton"):
        with fastvae.use_backend(backend):
            assert not _is_cpp_route(fastvae.reparameterize_kl(mu, logvar)[0]), backend


def test_second_derivatives_through_the_cpp_route_are_the_composites():
    """create_graph=True inside the C++ backward calls the composite's differentiable backward."""
    mu, logvar = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def z_and_kl(m, v):
        z, kl = fastvae.reparameterize_kl(m, v, generator=torch.Generator().manual_seed(5))
        assert _is_cpp_route(z)
        return z, kl

    with fastvae.use_backend("native"):
        assert torch.autograd.gradgradcheck(z_and_kl, (mu, logvar))


def test_the_kernels_signatures_in_eager_cpp_are_the_declared_ones():
    """eager.cpp calls the kernels through function pointers typed by hand; the types it states must
    be those of the prototypes the ctypes binding declares (checked against kernels/ by test_native_abi)."""
    (source,) = [path for path in eager_extension.sources() if path.parent.name == "gaussian"]
    text = source.read_text()
    stated = dict(re.findall(r"// ABI (\w+): (.+)", text))
    for direction in ("forward", "backward"):
        declared = [ctype for ctype, _ in library.DECLARED[f"fastvae_reparameterize_kl_{direction}"]]
        assert [t.strip() for t in stated[direction].split(",")] == declared, direction
        pointer_type = re.search(rf"using {direction.capitalize()}Kernel = int \(\*\)\(([^;]*)\);", text).group(1)
        assert [" ".join(t.split()) for t in pointer_type.split(",")] == declared, direction


def test_a_failed_build_warns_once_with_the_fix_and_the_python_route_runs(monkeypatch, tmp_path, recwarn):
    broken = tmp_path / "eager.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(eager_extension, "sources", lambda: [broken])
    monkeypatch.setenv(eager_extension.ENV_DIR, str(tmp_path / "build"))
    monkeypatch.setattr(eager_extension, "_loaded", None)  # as in a process that has not built it yet
    monkeypatch.setattr(eager_extension, "_failure", None)
    mu, logvar = _encoder_rows("contiguous", torch.float32)
    with fastvae.use_backend("native"):
        with pytest.warns(RuntimeWarning, match="(?s)could not be built.*this is not C.*ninja"):
            z, _ = fastvae.reparameterize_kl(mu, logvar)
        recwarn.clear()
        z_again, _ = fastvae.reparameterize_kl(mu, logvar)
    assert not _is_cpp_route(z) and not _is_cpp_route(z_again)
    assert not [w for w in recwarn if "eager C++" in str(w.message)], "the failure is warned once"


def test_switched_off_nothing_is_built_and_nothing_warns(monkeypatch, recwarn):
    monkeypatch.setenv(eager_extension.ENV_SWITCH, "0")
    monkeypatch.setattr(eager_extension, "_loaded", None)  # as in a process that has not decided yet
    monkeypatch.setattr(eager_extension, "_failure", None)
    mu, logvar = _encoder_rows("contiguous", torch.float32)
    with fastvae.use_backend("native"):
        assert not _is_cpp_route(fastvae.reparameterize_kl(mu, logvar)[0])
    assert eager_extension._loaded is None and "switched off" in eager_extension._failure
    assert not [w for w in recwarn if "eager C++" in str(w.message)]


def test_a_lock_left_by_a_killed_build_is_removed_where_torch_would_wait_on_it(monkeypatch, tmp_path):
    """Before torch 2.14 the builder waits while its lock file exists: one left by a build killed
    midway would hang every later process. fastvae removes one older than any build, saying so."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "FileBaton", object, raising=False)  # the file-existence lock
    folder = tmp_path / "build"
    folder.mkdir()
    stale, fresh = folder / "lock", tmp_path / "fresh" / "lock"
    fresh.parent.mkdir()
    for lock in (stale, fresh):
        lock.write_text("")
    old = time.time() - eager_extension.STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    with pytest.warns(RuntimeWarning, match="removed .*lock.* did not finish"):
        eager_extension.remove_a_stale_lock(folder)
    assert not stale.exists()
    eager_extension.remove_a_stale_lock(fresh.parent)  # a build in progress keeps its lock
    assert fresh.exists()
    monkeypatch.delattr(cpp_extension, "FileBaton")  # torch's OS lock dies with its holder: left alone
    os.utime(fresh, (old, old))
    eager_extension.remove_a_stale_lock(fresh.parent)
    assert fresh.exists()
