#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs the project, then runs
#   demo  — the main job on embedded defaults
#   test  — the whole test suite (what CI runs)
#   bench — a benchmark module, e.g. `scripts/dev.sh bench core --quick`
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DELTAGRAD_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    # the stamp makes reruns instant; it changes whenever pyproject.toml does
    local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[test]"
        touch "$stamp"
    fi
}

cmd=${1:-demo}
shift || true
setup
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# OpenMP threads sleep instead of spinning while idle: spinning made torch up to 10x slower on
# 2 cores shared with other processes (Ray workers, servers) — measured on this machine
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
case "$cmd" in
    demo)  exec "$VENV/bin/deltagrad-ray" demo "$@" ;;
    # BLAS / OpenMP threads: the two cores of this kind of machine unless set (the suite passes with 1
    # or 2: results of other processes are compared to round-off, tests/processes.py); the tests set
    # every other setting they rely on themselves (tests/conftest.py)
    test)  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
           exec "$VENV/bin/python" -m pytest "$@" ;;
    bench) name=$1; shift; exec "$VENV/bin/python" -m "benchmarks.$name" "$@" ;;
    setup) ;;
    *) echo "usage: scripts/dev.sh {demo|test|bench NAME|setup} [args]" >&2; exit 2 ;;
esac
