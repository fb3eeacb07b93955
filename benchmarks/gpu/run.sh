#!/usr/bin/env bash
# The prepared GPU run: one command that, on a fresh H100/H200 machine with no network and its
# preinstalled torch, builds fastvae and checks and measures it on the GPU in about 8 minutes:
#
#   bash benchmarks/gpu/run.sh OUTDIR
#
#   1. environment   device, driver, torch/triton versions, date        -> OUTDIR/environment.json
#   2. build         the native CPU library (cmake); fastvae runs from this checkout (PYTHONPATH)
#   3. tests         the whole suite on CUDA: CUDA-graph replays, reduce-overhead, fp16 with a
#                    GradScaler, one-process NCCL DDP, Triton against the reference
#   4. profile       host time per op call and launch; three ways a compiled graph can hold a
#                    kernel; where a training step's time goes          -> OUTDIR/profile.txt
#   5. ops           the GPU benchmark sweep (--gpu-run)                -> OUTDIR/ops.json
#   6. eval A/B      fastvae-eval's NLL, fused against unfused, K = 1000    -> OUTDIR/eval_ab.jsonl
#   7. train A/B     eager, compile, compile reduce-overhead, compile with the ops as composites;
#                    fp32, bf16; batch 128, 1024                        -> OUTDIR/train_ab.jsonl
#   8. report        tables and targets                                 -> OUTDIR/report.txt
#
# Every stage has a time limit and appends to OUTDIR/run.log; OUTDIR/summary.txt says how each
# ended. A stage at its limit is interrupted (SIGINT), so a benchmark stage still writes what it
# measured. GPU_RUN_SKIP, a regular expression, skips the stages whose names it matches (e.g.
# "A/B" when those were measured in an earlier run). The plot is drawn where the results land:
# `python -m benchmarks.report OUTDIR/ops.json`. With device time left after the run,
# `python -m benchmarks.gpu.tile_sweep` times the likelihood kernel with every tile and warp
# count (42 configurations, each compiled once) for choosing the GPU tiles, and `--dtype bf16`
# the same for half precision, whose rows today's tiles read 8 bytes per access. Without a CUDA
# device the same script is a rehearsal: each GPU stage runs at smoke size on the CPU and says so,
# so the script itself is tested where no GPU is.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu/run.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}  # the interpreter that has torch and triton (the GPU machine's python3)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: >"$OUT/summary.txt"
: >"$OUT/run.log"

say() { echo "$*" | tee -a "$OUT/summary.txt"; }

# The whole run has a budget (the device time a session is lent is short): each stage's limit is
# cut to what is left of it, and a stage with under 20 s left is skipped and says so. The last
# REPORT_SECONDS are kept for the report, which turns whatever was measured into tables.
BUDGET=${GPU_RUN_SECONDS:-480}
REPORT_SECONDS=30
DEADLINE=$(( $(date +%s) + BUDGET - REPORT_SECONDS ))

# stage NAME SECONDS COMMAND...: run with a time limit, log to run.log, record how it ended.
stage() {
  local name=$1 limit=$2 start rc left
  shift 2
  if [ -n "${GPU_RUN_SKIP:-}" ] && [[ $name =~ $GPU_RUN_SKIP ]]; then
    say "$name: skipped (GPU_RUN_SKIP)"
    return
  fi
  start=$(date +%s)
  left=$(( DEADLINE - start ))
  if [ "$left" -lt 20 ]; then
    say "$name: skipped (the run's ${BUDGET} s budget is spent)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "==> $name: $*" >>"$OUT/run.log"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$OUT/run.log" 2>&1
  rc=$?
  case $rc in
    0) say "$name: ok ($(( $(date +%s) - start )) s)" ;;
    124|137) say "$name: stopped at its ${limit} s limit (partial results kept)" ;;
    *) say "$name: failed with exit code $rc ($(( $(date +%s) - start )) s); see run.log" ;;
  esac
}

if ! "$PY" -c "import torch, triton" 2>>"$OUT/run.log"; then
  say "$PY cannot import torch and triton: run with PYTHON=/path/to/python of the environment that has them"
  exit 1
fi
"$PY" benchmarks/gpu/environment.py >"$OUT/environment.json" 2>>"$OUT/run.log" || say "environment: failed"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=1
  say "device: $("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
else
  GPU=0
  say "device: no CUDA device. REHEARSAL: the GPU stages run at smoke size on the CPU, and CUDA-only tests skip"
fi

stage build 120 bash -c 'cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$(nproc)"'
# The eager C++ routes are built for this torch on first use; here once, before the tests' workers
# would each wait for one build (fastvae.ops.eager_extension: without a compiler or ninja it warns
# and the routes run in Python, which this stage then reports as failed).
stage "eager C++ routes" 90 "$PY" -c "import sys; from fastvae.ops import eager_extension
sys.exit(eager_extension.operators() is None)"

if [ "$GPU" = 1 ]; then
  workers=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  # The tests that run the kernels on the GPU go first, so a budget cut falls on the app's tests.
  # test_triton_compile.py is left to CI: it compiles for sm_80/sm_90 without a GPU, under both
  # triton versions, and takes minutes this run cannot spare.
  kernel_tests="tests/test_cuda.py tests/test_ops.py tests/test_iwae.py tests/test_likelihoods.py tests/test_noise.py
    tests/test_edge_cases.py tests/test_compile.py tests/test_autodiff.py tests/test_validation.py"
  stage "tests (kernels on CUDA)" 110 "$PY" -m pytest -q -p no:cacheprovider -rs $workers $kernel_tests
  stage "tests (the rest)" 75 "$PY" -m pytest -q -p no:cacheprovider $workers --ignore=tests/test_triton_compile.py \
    $(for t in $kernel_tests; do printf -- '--ignore=%s ' "$t"; done)
  # The profile answers the open design question (how a compiled graph should hold the kernels),
  # so it runs before the sweep.
  stage profile 100 bash -c "'$PY' -m benchmarks.gpu.launch_overhead > '$OUT/profile.txt' \
    && '$PY' -m benchmarks.gpu.profile_step >> '$OUT/profile.txt'"
  stage ops 120 "$PY" -m pytest benchmarks/bench_ops.py --benchmark-only --gpu-run -q -p no:cacheprovider \
    --benchmark-json="$OUT/ops.json"
  stage "eval A/B (fused NLL against unfused, K = 1000)" 40 "$PY" -m benchmarks.eval_ab --repeats 5 \
    --json "$OUT/eval_ab.jsonl"
  for batch in 128 1024; do
    for mode in eager default reduce-overhead; do
      stage "train A/B batch $batch $mode" 60 "$PY" -m benchmarks.train_ab --compile "$mode" \
        --batch-size "$batch" --blocks 20 --steps 5 --json "$OUT/train_ab.jsonl"
    done
    # The default mode again with each fastvae op as its composite, fused by inductor
    # (fastvae.ops.common.COMPILED_CUDA_COMPOSITE_MAX_ELEMENTS): the alternative to the node.
    stage "train A/B batch $batch default composite" 60 "$PY" -m benchmarks.train_ab --compile default \
      --cuda-composite --batch-size "$batch" --blocks 20 --steps 5 --json "$OUT/train_ab.jsonl"
  done
else
  stage "tests (CUDA and registry tests only)" 200 "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_cuda.py tests/test_registry.py
  stage "ops (smoke: one op, CPU)" 200 "$PY" -m pytest benchmarks/bench_ops.py --benchmark-only \
    --benchmark-min-rounds=1 --bench-seconds=0.01 -q -p no:cacheprovider -k "vae_loss and B128 and fp32" \
    --benchmark-json="$OUT/ops.json"
  stage "profile (smoke: eager, CPU)" 60 bash -c "'$PY' -m benchmarks.gpu.launch_overhead --calls 40 > '$OUT/profile.txt' \
    && '$PY' -m benchmarks.gpu.profile_step --modes eager --steps 2 >> '$OUT/profile.txt'"
  stage "eval A/B (smoke: K = 20, CPU)" 60 "$PY" -m benchmarks.eval_ab --samples 20 --images 4 --repeats 2 \
    --json "$OUT/eval_ab.jsonl"
  stage "train A/B (smoke: eager, CPU)" 120 "$PY" -m benchmarks.train_ab --compile eager --blocks 2 --steps 1 \
    --json "$OUT/train_ab.jsonl"
  say "train A/B reduce-overhead: skipped (CUDA graphs need a CUDA device)"
fi

# Each part of the report is written on its own: a part whose results are missing says so and
# leaves the others.
DEADLINE=$(( $(date +%s) + REPORT_SECONDS ))
: >"$OUT/report.txt"
PLOT=$(mktemp -d)/ops.png  # not in OUTDIR: the device returns a few files only
report_part() {
  local file=$1
  shift
  if [ -s "$OUT/$file" ]; then
    "$PY" -m "$@" >>"$OUT/report.txt" 2>&1 || echo "($file: the report failed; see above)" >>"$OUT/report.txt"
  else
    echo "($file: nothing was measured)" >>"$OUT/report.txt"
  fi
}
stage report "$REPORT_SECONDS" bash -c "$(declare -f report_part); OUT='$OUT' PY='$PY'; \
  report_part ops.json benchmarks.report '$OUT/ops.json' --plot '$PLOT'; \
  report_part train_ab.jsonl benchmarks.train_ab --report '$OUT/train_ab.jsonl'; \
  report_part eval_ab.jsonl json.tool --json-lines '$OUT/eval_ab.jsonl'"
say "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
