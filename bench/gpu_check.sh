#!/usr/bin/env bash
# One call on a lent GPU: tests/test_cuda.py, bench.report (eager and compiled, fp32 and bf16, peak
# memory) and the trainer's images/s, into OUT_DIR/gpu_check.json. See bench/gpu_check.py.
#   bench/gpu_check.sh OUT_DIR [--budget-s 450] [--only STAGE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m bench.gpu_check "$@"
