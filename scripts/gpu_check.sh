#!/usr/bin/env bash
# One call on the GPU machine: build and install offline, run the GPU tests
# and the benchmarks, and leave the logs in $OUT (or ./out).
#   bash scripts/gpu_check.sh [test paths and pytest args; default: tests]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; "$python" -c "import jax; print(jax.__version__, jax.devices())"; } 2>&1 | tee "$out/device.log"
"$python" -m pip install --no-build-isolation --no-deps --no-index -q . 2>&1 | tee "$out/build.log" || exit 1
# -P: import the installed package, not the source tree.
"$python" -X faulthandler -P -m pytest -m gpu -q -p no:cacheprovider "${@:-tests}" 2>&1 | tee "$out/gpu_tests.log" || status=1
(cd /tmp && "$python" -X faulthandler -m jax_vattention.bench alloc) 2>&1 | tee "$out/bench_alloc.log" || status=1
exit $status
