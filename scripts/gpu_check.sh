#!/usr/bin/env bash
# The GPU check (issue 13, point 5; split in issue 25), on a machine with CUDA:
#   1. the GPU tests, `pytest tests/gpu -m cuda`: the core and batched replays and exact retraining on
#      cuda against the CPU (float64, float32), and a two-actor Ray fan-out on one GPU with a CPU-only
#      driver against the serial CPU backend, to the tolerances of tests/gpu/checks.py;
#   2. the GPU benchmark, `python -m benchmarks.gpu`: the batched explicit step's throughput against
#      the GPU's matmul peak (float64, float32, TF32), one JSON line per measurement.
# Both run, in that order, within one time limit (8 minutes; set GPU_CHECK_LIMIT_S to change it).
# Exit status: 124 past the limit, else pytest's when a test failed, else the benchmark's (1 when a
# measurement is not ok). Without a CUDA device it prints one line saying so and exits 0.
#
#   scripts/gpu_check.sh                        # the tests, then the benchmark
#   scripts/gpu_check.sh --batch-sizes 32       # arguments go to the benchmark (see its --help)
#
# The tests' CPU-against-CPU versions run with the rest of the suite (tests/gpu/test_cpu.py).
# Python: $PYTHON, else .venv/bin/python (scripts/dev.sh setup creates it), else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # Ray's actors import this checkout too
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
LIMIT=${GPU_CHECK_LIMIT_S:-480}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    exec "$PY" -m benchmarks.gpu  # no CUDA device: its one line saying so, exit 0 (or torch's import error)
fi
timed_out() {
    echo "{\"check\": \"time\", \"ok\": false, \"error\": \"$1 did not finish within the check's ${LIMIT} s\"}"
    exit 124
}
start=$SECONDS
timeout --kill-after=20 "$LIMIT" "$PY" -m pytest tests/gpu -m cuda -q -p no:cacheprovider
tests_rc=$?
if [ "$tests_rc" -eq 124 ] || [ "$tests_rc" -eq 137 ]; then timed_out "the GPU tests"; fi
left=$((LIMIT - (SECONDS - start)))
if [ "$left" -le 0 ]; then timed_out "the GPU tests"; fi
timeout --kill-after=20 "$left" "$PY" -m benchmarks.gpu "$@"
bench_rc=$?
if [ "$bench_rc" -eq 124 ] || [ "$bench_rc" -eq 137 ]; then timed_out "the GPU benchmark"; fi
if [ "$tests_rc" -ne 0 ]; then exit "$tests_rc"; fi
exit "$bench_rc"
