"""pytest-benchmark suites for the fused fastvae ops and the report that reads their results.

Run ``pytest benchmarks --benchmark-only --benchmark-json=RESULTS.json`` and then
``python -m benchmarks.report RESULTS.json``. The axes every suite runs over live in
`benchmarks.axes`; the measurement itself in `benchmarks.harness`.
"""
