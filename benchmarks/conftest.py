"""pytest wiring for the benchmarks: collection of bench_*.py, the options, the case
parametrization from `benchmarks.axes`, and the machine description written into
pytest-benchmark's JSON so a results file says where it was measured."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import pytest
import torch

from benchmarks import axes, harness
from fastvae.ops.registry import op_specs


def pytest_addoption(parser):
    group = parser.getgroup("fastvae benchmarks")
    group.addoption(
        "--bench-device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="device to benchmark on (default: auto, CUDA when available, else CPU)",
    )
    group.addoption(
        "--bench-seconds",
        type=float,
        default=0.2,
        help=f"timed seconds per case, at least {harness.MIN_ROUNDS} rounds (default: 0.2)",
    )
    group.addoption(
        "--sweep", action="store_true", help="run every size, precision and mode (the default is the headline settings)"
    )
    group.addoption(
        "--gpu-run", action="store_true", help="the sweep sized for the prepared GPU run (benchmarks/gpu/run.sh)"
    )


_LOAD_AT_START = pytest.StashKey[tuple]()


_CPU_ALLOCATOR = pytest.StashKey[str]()
_INDUCTOR_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    # Other processes on a small machine skew CPU timings: the JSON records the load around the run.
    config.stash[_LOAD_AT_START] = os.getloadavg()
    # Before any case allocates: see harness.pin_cpu_allocator.
    config.stash[_CPU_ALLOCATOR] = harness.pin_cpu_allocator()
    # Before anything compiles: see fastvae.train.inductor_cache.
    config.stash[_INDUCTOR_CACHE] = harness.isolate_inductor_cache()


def bench_device(config) -> torch.device:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules, unless python_files or the command line already does."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(file_path.match(pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def selection(config) -> str:
    if config.getoption("--gpu-run"):
        return "gpu-run"
    return "sweep" if config.getoption("--sweep") else "default"


def pytest_generate_tests(metafunc):
    """A test that asks for `case` and `spec` gets every case of every benchmarked op of the registry."""
    if "case" not in metafunc.fixturenames:
        return
    device = bench_device(metafunc.config)
    chosen = selection(metafunc.config)
    specs = op_specs()
    if chosen == "gpu-run":  # the targets' ops first: a stage cut at its time limit keeps them
        specs = sorted(specs, key=lambda spec: spec.name not in axes.GPU_TARGET_OPS)
    params = [
        pytest.param(case, spec, id=case.id)
        for spec in specs
        if spec.benchmark
        for case in axes.cases(spec.name, spec.axes, device, chosen)
    ]
    metafunc.parametrize(("case", "spec"), params)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return bench_device(request.config)


@pytest.fixture(scope="session")
def bench_seconds(request) -> float:
    return request.config.getoption("--bench-seconds")


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=os.path.dirname(__file__)
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    """Make the JSON self-describing: device, versions, date, copy bandwidth, fastvae backends."""
    import fastvae

    device = bench_device(config)
    machine_info["fastvae"] = {
        "device": device.type,
        "device_name": harness.device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # The vector ISA of torch's own CPU kernels (and inductor's): ATEN_CPU_CAPABILITY
        # changes it, and on some machines AVX2 kernels beat the AVX-512 ones.
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "copy_gbps": harness.copy_bandwidth_gbps(device),  # at the end; each case records its own
        "backends": fastvae.available_backends(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "selection": selection(config),
        "cpu_allocator": config.stash.get(_CPU_ALLOCATOR, harness.UNPINNED_ALLOCATOR),
        "inductor_cache": config.stash.get(_INDUCTOR_CACHE, None),
        "load_average_1_5_15_min_at_start": config.stash.get(_LOAD_AT_START, None),
        "load_average_1_5_15_min_at_end": os.getloadavg(),
        **_versions(),
    }
