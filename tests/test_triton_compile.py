"""Every Triton kernel, in every specialization its launcher can request and as a launch at a model's
sizes compiles it, compiles for real NVIDIA GPUs (sm_80 and sm_90) without a GPU, and spills no
register (benchmarks/triton_resources.py)."""

from __future__ import annotations

import pytest

from benchmarks.triton_resources import ARCHS, compile_all, launched_resources, summary

from helpers import run_without_interpreter, without_a_gpu

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compile_all(ARCHS, workers=2)


def test_every_specialization_compiles_for_every_arch(compiled):
    from fastvae.ops.registry import FAMILIES

    kernels = {s.kernel.fn.__name__ for f in FAMILIES for s in f.module("triton").specializations()}
    assert {r["kernel"] for r in compiled} == kernels
    assert {r["arch"] for r in compiled} == {f"sm_{a}" for a in ARCHS}
    failed = [f"{r['specialization']} {r['arch']}: {r['error']}" for r in compiled if r["error"]]
    assert not failed, "\n".join(failed[:10])


def test_no_specialization_spills(compiled):
    spilling = [
        f"{r['specialization']} {r['arch']}: {r['registers']} registers, {r['spill_store_bytes']} bytes spilled"
        for r in compiled
        if not r["error"] and (r["spill_store_bytes"] or r["spill_load_bytes"])
    ]
    assert not spilling, "\n".join(spilling[:10] + summary(compiled))


@pytest.fixture(scope="module")
def launched() -> list[dict]:
    return launched_resources(ARCHS)


@without_a_gpu
def test_every_kernel_as_launched_at_a_models_sizes_compiles_without_spills(launched):
    """The lists compile for any argument values. A real launch also specializes on them: with
    16-byte-aligned pointers and sizes divisible by 16 (a batch of 128 28 x 28 images, 32 latents)
    Triton compiles vectorized loads and stores, another kernel with other registers, and makes
    integers equal to 1 constants. Each kernel the launchers start at such sizes, compiled as
    Triton's own dispatch compiles it for sm_80 and sm_90, must compile and not spill."""
    from fastvae.ops.registry import FAMILIES

    kernels = {s.kernel.fn.__name__ for f in FAMILIES for s in f.module("triton").specializations()}
    assert {r["kernel"] for r in launched} == kernels, "some kernel was never launched: the check misses it"
    assert {r["arch"] for r in launched} == {f"sm_{a}" for a in ARCHS}
    unaligned = [r["specialization"] for r in launched if not set(r["pointers"]) <= set(r["divisible"])]
    assert not unaligned, f"launched with pointers not known to be aligned, not the vectorized form: {unaligned[:3]}"
    spilling = [
        f"{r['specialization']} {r['arch']}: {r['registers']} registers, {r['spill_store_bytes']} bytes spilled"
        for r in launched
        if r["spill_store_bytes"] or r["spill_load_bytes"]
    ]
    assert not spilling, "\n".join(spilling[:10] + summary(launched))


@without_a_gpu
def test_float32_kernels_as_launched_at_a_models_sizes_read_16_bytes_at_a_time(launched):
    """What the aligned form is for: a kernel whose tensors are all float32 reads its rows with
    16-byte vector loads (4 elements per thread of a 1024-element tile). An index computation
    Triton can no longer prove contiguous and aligned falls back to 4-byte loads, a quarter of
    the width, which only a GPU's bandwidth would show (checked: the Bernoulli kernel's loads
    with a column index Triton cannot see through compile to 4-byte loads, and this fails)."""
    float32_only = [r for r in launched if set(r["pointers"].values()) <= {"*fp32", "*i64"}]  # *i64: the seed
    assert {r["kernel"] for r in float32_only} == {r["kernel"] for r in launched}
    narrow = [f"{r['specialization']} {r['arch']}: loads {r['loads']}" for r in float32_only if 16 not in r["loads"]]
    assert not narrow, "\n".join(narrow[:10])


def test_float_arguments_are_float64_where_the_launcher_passes_them():
    """A Python float reaches a kernel as float32 unless its parameter says float64: the loss
    weight -1/B would then be rounded, a 1e-8 relative error in float64 gradients on the GPU
    (the interpreter keeps Python's double, so only the declared type shows it here)."""
    import inspect

    import triton.language as tl

    from fastvae.ops.registry import FAMILIES

    checked = 0
    for family in FAMILIES:
        for spec in family.module("triton").specializations():
            params = inspect.signature(spec.kernel.fn).parameters
            for name in spec.floats:
                declared = params[name].annotation
                assert declared in (tl.float64, "tl.float64"), f"{spec.kernel.fn.__name__}: {name} is {declared}"
                assert spec.signature()[name] == "fp64"
                checked += 1
    assert checked, "no kernel takes a float argument: this test no longer checks anything"


@without_a_gpu
def test_every_specialization_the_launchers_request_is_one_that_is_compiled_here():
    """The lists above are written by hand beside each launcher: here the launchers run (every
    public op, every reduction, every dtype pair, forward and backward) through Triton's real
    dispatch for sm_90 with a recording driver (benchmarks/recording_driver.py), in a process
    without the interpreter, and each specialization they request must be on a list, or a GPU
    would compile a kernel that no test compiled."""
    import json

    from fastvae.ops.registry import FAMILIES

    script = (
        "import json; from benchmarks.recording_driver import launched_specializations; "
        "print(json.dumps(launched_specializations()))"
    )
    result = run_without_interpreter(["-c", script], timeout=600)
    requested = json.loads(result.stdout.strip().splitlines()[-1])

    def text(kernel, pointers, constexprs) -> str:
        return json.dumps([kernel, sorted(pointers.items()), sorted(constexprs.items())])

    listed = {
        text(
            s.kernel.fn.__name__,
            {k: v for k, v in s.signature().items() if v.startswith("*")},
            {k: str(getattr(v, "name", v)) for k, v in s.constexprs.items()},
        )
        for f in FAMILIES
        for s in f.module("triton").specializations()
    }
    kernels = {s.kernel.fn.__name__ for f in FAMILIES for s in f.module("triton").specializations()}
    assert {r["kernel"] for r in requested} == kernels, "some kernel was never launched: the check misses it"
    unlisted = [r for r in requested if text(r["kernel"], r["pointers"], r["constexprs"]) not in listed]
    assert not unlisted, f"{len(unlisted)} requested specializations are on no list, e.g. {unlisted[:3]}"
