"""Every op of the registry (fastvae.ops.registry.op_specs, benchmark=True): fastvae against the
plain PyTorch a user writes, eager and torch.compile'd, in the modes and sizes of
benchmarks.axes.

    pytest benchmarks/bench_ops.py --benchmark-only                  # the headline settings
    pytest benchmarks/bench_ops.py --benchmark-only --sweep          # every size, precision, mode
    pytest benchmarks/bench_ops.py --benchmark-only -k vae_loss      # one op
"""

from benchmarks.harness import run_case


def test_op(benchmark, case, spec, device, bench_seconds):
    run_case(benchmark, spec, case, device, bench_seconds)
