#!/usr/bin/env bash
# One call on the GPU machine: build and install offline, run the GPU tests,
# the allocation benchmark, generate with both GPU backends and serve-bench on
# a Llama-3-8B-shaped model; logs go to $OUT (or ./out).
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
timeout 300 "$python" -X faulthandler -P -m pytest -m gpu -q -p no:cacheprovider "${@:-tests}" 2>&1 | tee "$out/gpu_tests.log" || status=1
# The benchmarks run from /tmp, away from the source tree.
cd /tmp
timeout 60 "$python" -m jax_vattention.bench alloc 2>&1 | tee "$out/bench_alloc.log" || status=1
for backend in cudnn pallas; do
  timeout 90 "$python" -m jax_vattention.cli generate --backend "$backend" 2>&1 | tail -8
done | tee "$out/generate.log" || status=1
# Serving at a fixed budget, per-layer and interleaved layouts (the batch against an ideal allocator).
for layout in per_layer interleaved; do
  timeout 300 "$python" -m jax_vattention.cli serve-bench --config llama-3-8b --requests 64 --rate 40 \
    --prompt-len 64 700 --output-len 32 256 --max-batch 32 --max-len 1024 --budget-mib 3072 \
    --chunk-steps 16 --layout "$layout" --out "$out/serve" 2>&1 | grep -v "requests:"
done | tee "$out/serve.log" || status=1
# The cost of a decode step that crosses a page: one step per chunk, all requests admitted at once;
# again with XLA's command buffers (CUDA graphs) off.
crossing="--config llama-3-8b --requests 16 --rate 100000 --prompt-len 1000 1015 --output-len 100 120
  --max-batch 16 --max-len 2048 --budget-mib 8192 --chunk-steps 1 --out /tmp/crossing"
{ timeout 150 "$python" -m jax_vattention.cli serve-bench $crossing 2>&1 | grep -E "cache,|decode chunk|mapping"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 "$python" -m jax_vattention.cli serve-bench $crossing \
    2>&1 | grep -E "cache,|decode chunk|mapping"; } | tee "$out/crossing.log" || status=1
exit $status
