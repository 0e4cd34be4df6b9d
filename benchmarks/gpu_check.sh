#!/usr/bin/env bash
# The GPU check, one command from a fresh checkout on one GPU, in under 8 minutes:
#   bash benchmarks/gpu_check.sh
# installs (as `make venv` does; a working .venv is reused), runs the CUDA tests (tests/gpu/test_cuda.py:
# bf16 and fp16 steps, SyncBN, DDP over NCCL, resume), times soco_r50_fpn at batch 64 and 128 and the data
# loader with 16 workers (benchmarks/gpu_check.py), and writes ${OUT:-benchmarks/results}/gpu_check.json
# with every figure and each sub-check's status and seconds; logs go to gpu_check_logs/ beside it.
# Every sub-step has its own time limit, taken from what is left of the budget; a failed one is recorded
# and the next runs. Without CUDA the tests and timings are recorded as skipped and the exit status is 0.
# Exit status: 0 when nothing failed, 1 otherwise.
#
# Environment: OUT (output folder), PYTHON (interpreter that makes .venv, default python3),
# SOCO_GPU_CHECK_SKIP_INSTALL=1 (use .venv as it is), SOCO_GPU_CHECK_BUDGET_S (default 465 s).
set -uo pipefail  # no -e: a failed sub-step is recorded and the next one runs
cd "$(dirname "$0")/.." || exit 1
LC_NUMERIC=C  # EPOCHREALTIME with a decimal point whatever the user's locale

OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/gpu_check_logs"
rm -rf "$LOGS"
mkdir -p "$LOGS" || exit 1
STEPS="$LOGS/steps.tsv"
: >"$STEPS"
VENV=.venv
PY="$VENV/bin/python"
BUDGET_S="${SOCO_GPU_CHECK_BUDGET_S:-465}"  # 8 minutes less the report and the slack of each kill
START_S=$SECONDS

now() { echo "${EPOCHREALTIME:-$SECONDS}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
STARTED=$(now)

# record NAME STATUS EXIT_CODE SECONDS LIMIT LOG NOTE: one line of steps.tsv
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "${7:-}" >>"$STEPS"
}

# run_step NAME CAP_S RESERVE_S COMMAND...: run COMMAND with its output in NAME.log, limited to CAP_S
# seconds and to what the budget leaves once RESERVE_S are kept for the steps after it.
run_step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$((BUDGET_S - (SECONDS - START_S) - reserve))
    local limit=$((cap < left ? cap : left))
    local log="$LOGS/$name.log"
    if ((limit < 5)); then
        record "$name" "timed out" "" 0 0 "" "no time left in the ${BUDGET_S} s budget"
        echo "== $name: no time left"
        return 1
    fi
    echo "== $name (limit ${limit} s)"
    local started code status
    started=$(now)
    timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
    code=$?
    local seconds
    seconds=$(since "$started")
    case $code in
        0) status=passed ;;
        124 | 137) status="timed out" ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$code" "$seconds" "$limit" "$log"
    echo "   $status in ${seconds} s"
    tail -n 3 "$log" | sed 's/^/   | /'
    return "$code"
}

skip() {  # skip NAME WHY
    record "$1" skipped "" 0 "" "" "$2"
    echo "== $1: skipped ($2)"
}

# Whether .venv runs this checkout's soco with the torch and torchvision that pyproject.toml pins, and pytest.
venv_works() {
    [ -x "$PY" ] && [ "$VENV/.installed" -nt pyproject.toml ] && "$PY" - <<'EOF' >/dev/null 2>&1
import re
from importlib.metadata import version
from pathlib import Path

import pytest, pytest_timeout, soco  # noqa: F401

assert Path(soco.__file__).resolve().is_relative_to(Path("src").resolve()), "soco comes from another checkout"
for name, pinned in re.findall(r'"(torch|torchvision)==([^"]+)"', Path("pyproject.toml").read_text()):
    assert version(name).split("+")[0] == pinned, (name, version(name), pinned)
EOF
}

INSTALL="set -e
[ -x '$PY' ] || \"\${PYTHON:-python3}\" -m venv '$VENV'
'$PY' -m pip install --progress-bar off --upgrade pip
'$PY' -m pip install --progress-bar off -e '.[test]'
touch '$VENV/.installed'"

# 1. install: as `make venv` does, unless a working .venv is already there
if [ "${SOCO_GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    skip install "SOCO_GPU_CHECK_SKIP_INSTALL=1: using $VENV as it is"
elif venv_works; then
    skip install "$VENV already works: reused"
else
    run_step install 280 160 bash -c "$INSTALL"
fi
[ -x "$PY" ] || PY="${PYTHON:-python3}"

# 2. what the machine has
NO_CUDA="no CUDA device"
run_step cuda_probe 60 140 "$PY" benchmarks/gpu_check.py probe --json "$LOGS/environment.json" ||
    NO_CUDA="the CUDA probe failed (see cuda_probe.log)"
CUDA=0
grep -q '"cuda": true' "$LOGS/environment.json" 2>/dev/null && CUDA=1

if [ "$CUDA" = 1 ]; then
    # 3. the CUDA tests, each test also limited on its own (pytest-timeout)
    run_step cuda_tests 170 110 "$PY" -m pytest -v -rfEs -p no:cacheprovider --timeout=150 \
        --junitxml="$LOGS/cuda_tests.xml" tests/gpu/test_cuda.py
    # 4. timings, each in its own process: an out-of-memory or a hang costs only its own figure.
    # The data step comes first: it also copies the default photos and computes their proposals, once.
    run_step bench_data 100 70 "$PY" benchmarks/gpu_check.py --only data --workers 16 \
        --json "$LOGS/bench_data.json"
    run_step bench_batch_64 70 35 "$PY" benchmarks/gpu_check.py --only model --batch-size 64 \
        --json "$LOGS/bench_batch_64.json"
    run_step bench_batch_128 90 0 "$PY" benchmarks/gpu_check.py --only model --batch-size 128 \
        --json "$LOGS/bench_batch_128.json"
else
    for name in cuda_tests bench_data bench_batch_64 bench_batch_128; do
        skip "$name" "$NO_CUDA"
    done
fi

# 5. the one JSON (the report needs only the standard library: it also runs when the install failed)
REPORT=(benchmarks/gpu_check.py report --logs "$LOGS" --json "$OUT/gpu_check.json"
    --wall-seconds "$(since "$STARTED")")
"$PY" "${REPORT[@]}" || "${PYTHON:-python3}" "${REPORT[@]}" || exit 1
grep -q '"passed": true' "$OUT/gpu_check.json"
