#!/usr/bin/env bash
# Run the torchrun tests (2 CPU processes, gloo) N times in a row and count clean exits, failures
# and teardown aborts ("terminate called ...", SIGABRT). Not part of the suite.
#   source env.sh && bash benchmarks/torchrun_teardown_loop.sh [N] [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
expr="${2:-predict_and_memory_build_under_torchrun}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0
export FILO_CACHE_DIR="${FILO_CACHE_DIR:-$(mktemp -d)}"
log="$(mktemp)"
passed=0; failed=0; aborts=0
for i in $(seq 1 "$n"); do
    if python -m pytest -q -p no:cacheprovider tests/test_distributed.py -k "$expr" >"$log" 2>&1; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
    fi
    if grep -q -E "terminate called|SIGABRT|Signals.SIGABRT|exitcode *: -6" "$log"; then
        aborts=$((aborts + 1))
        grep -m3 -E "terminate called|SIGABRT|exitcode" "$log"
    fi
    echo "run $i/$n: passed=$passed failed=$failed aborts=$aborts"
done
rm -f "$log"
echo "torchrun teardown loop: $passed passed, $failed failed, $aborts aborts in $n runs"
[ "$failed" -eq 0 ] && [ "$aborts" -eq 0 ]
