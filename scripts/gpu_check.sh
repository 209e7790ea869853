#!/usr/bin/env bash
# The GPU check (issue 13, point 5), on a machine with CUDA:
#   1. the core and batched replays and exact retraining on cuda against the CPU (float64, float32),
#   2. a two-actor Ray fan-out on one GPU with a CPU-only driver against the serial CPU backend,
#   3. the batched explicit step's throughput against the GPU's matmul peak (float64, float32, TF32).
# One JSON line per check; exit 1 when a check fails, 124 past the time limit (8 minutes; set
# GPU_CHECK_LIMIT_S to change it). Without a CUDA device it prints one line saying so and exits 0.
#
#   scripts/gpu_check.sh                   # everything on cuda
#   scripts/gpu_check.sh --device cpu      # the same checks CPU against CPU (exercises the code paths)
#   scripts/gpu_check.sh --parts core,ray  # some parts; --help lists the options
#
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
timeout --kill-after=20 "$LIMIT" "$PY" -m benchmarks.gpu "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "{\"check\": \"time\", \"ok\": false, \"error\": \"the check did not finish within ${LIMIT} s\"}"
fi
exit "$rc"
