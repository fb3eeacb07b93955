"""Every Triton kernel, in every specialization its launcher can request, compiles for real NVIDIA
GPUs (sm_80 and sm_90) without a GPU, and spills no register (benchmarks/triton_resources.py)."""

from __future__ import annotations

import pytest

from benchmarks.triton_resources import ARCHS, compile_all, summary

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
