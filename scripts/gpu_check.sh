#!/usr/bin/env bash
# One call on the GPU machine: build and install offline, then the chosen sections; logs go to $OUT
# (or ./out), one file per section (the device returns at most 8 files).
#   bash scripts/gpu_check.sh [section ...]
# Sections (default: all, in this order):
#   tests      the GPU tests (pytest -m gpu; GPU_TESTS="file ...": those files only)
#   alloc      vattention bench alloc
#   generate   vattention generate with both GPU backends
#   serve      serve-bench on a Llama-3-8B shape at a fixed budget, both layouts
#   stall      serve-bench on issue 12's workload (Llama-3-8B shape, interleaved, 128 requests at once,
#              prompt U(64, 700), 144 out, 64 slots, 16 GiB), the engine plain and pipelined
#              (STALL_RUNS: the runs, default "plain pipelined"; a run named ...-profiled also traces
#              a window of steps with --profile, e.g. STALL_RUNS="plain pipelined pipelined-profiled")
#   prefix     serve-bench on a Llama-3-8B shape (interleaved) with a 1024-token system prompt before
#              U(32, 256) user tokens, 128 requests, prefix sharing on and off in turn at one budget, and
#              the two runs' tokens compared (not in the default list; PREFIX_RUNS="on" or "off": one run)
#   crossing   vattention bench crossing, both layouts (CROSSING_NO_GRAPHS=1: again with XLA's CUDA
#              graphs off)
#   soak       the engine soak at a tight budget with random preemptions (SOAK_STEPS decode steps,
#              default 20000), in its own process
#   server     vattention serve on the tiny model, one completion and one streamed chat through curl
#   chat       generate --model smollm2-135m --chat, both layouts (needs the SmolLM2 file installed)
#   decode     vattention bench decode, Llama-3-8B shape: static, virtual (both layouts) and paged (cuDNN
#              paged, Pallas paged) caches through the same model code, batch DECODE_BATCH (default
#              16 64) x context DECODE_CONTEXT (default 2048 8192); CSV and PNG into $OUT (not in the
#              default list; a point that does not fit in the card's memory is recorded as such)
#   tp         tensor parallelism on the first 2 GPUs (not in the default list), one call of ~9 minutes:
#              its GPU tests (TP 2 gives TP 1's tokens in generate and in the engine, free memory per
#              device), bench decode --tp 1 2 on Llama-3-8B at batch 32, context 4K (prints TP 2 / TP 1;
#              target <= 0.60), then serve-bench --tp 2 on Llama-3-8B (the serve section's workload at
#              the same total budget, 768 MiB per device)
#   tp70b      serve-bench on a Llama-3-70B shape, random bf16 weights made in their shards (not in the
#              default list, ~5 minutes): 64 requests, prompt U(64,512), 128 out, 32 slots, 16 GiB of
#              cache per device; over 2 GPUs of >= 120 GiB (H200) or else 4 (H100), TP70B_TP=N to choose
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
sections="${*:-tests alloc generate serve crossing}"
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u
  "$python" -c "import jax; print(jax.__version__, jax.devices())"; } 2>&1 | tee "$out/setup.log"
"$python" -m pip install --no-build-isolation --no-deps --no-index -q . 2>&1 | tee -a "$out/setup.log" || exit 1
tests="$PWD/tests"
# The rest runs from /tmp, away from the source tree, so it imports the installed package.
cd /tmp
# Progress-bar lines dropped but the last, which says where a run stopped.
last_progress() { awk '/it\/s\]$|s\/it\]$|\?it\/s\]$/ { last = $0; next } { print } END { if (last) print last }'; }
for section in $sections; do
  case "$section" in
    tp)
      # The tests' own decode timing is deselected: bench decode --tp 1 2 measures the same step.
      timeout 240 "$python" -X faulthandler -m pytest -m gpu -q -s -p no:cacheprovider --rootdir "$tests" \
        --deselect "test_gpu_tensor_parallel.py::test_gpu_tensor_parallel_case[decode_step_timing]" \
        "$tests/test_gpu_tensor_parallel.py" 2>&1 | tee "$out/tp.log" || status=1
      timeout 200 "$python" -m jax_vattention.app.cli bench decode --config llama-3-8b --tp 1 2 --batch 32 \
        --context 4096 --modes virtual_interleaved --steps 8 --repeats 3 --copy-gib 1 --out /tmp/tp_decode 2>&1 \
        | tee -a "$out/tp.log" || status=1
      timeout 180 "$python" -m jax_vattention.app.cli serve-bench --config llama-3-8b --tp 2 --requests 64 --rate 40 \
        --prompt-len 64 700 --output-len 32 256 --max-batch 32 --max-len 1024 --budget-mib 768 \
        --out /tmp/serve_tp2 2>&1 | tr '\r' '\n' | last_progress | tee -a "$out/tp.log" || status=1 ;;
    tp70b)
      # 70B in bf16 is 131 GiB of weights: 67.7 GiB a device at TP 2, 35.8 at TP 4 (serve-bench
      # refuses in one line, before building anything, when weights + budget + 2 GiB do not fit).
      tp70b="${TP70B_TP:-}"
      if [ -z "$tp70b" ]; then
        memory=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
        tp70b=$([ "${memory:-0}" -ge 122880 ] && echo 2 || echo 4)
      fi
      timeout 420 "$python" -m jax_vattention.app.cli serve-bench --config llama-3-70b --tp "$tp70b" --requests 64 \
        --rate 40 --prompt-len 64 512 --output-len 128 128 --max-batch 32 --max-len 1024 --budget-mib 16384 \
        --out /tmp/serve_70b 2>&1 | tr '\r' '\n' | last_progress | tee "$out/tp70b.log" || status=1 ;;
    tests)
      # GPU_TESTS: test files to run (default: all).
      # The soak has its own section.
      # The whole suite takes about 9 minutes on an H200 (the chunk kernel's 54 compiled cases among
      # them): run this section alone in a call, or give it GPU_TESTS.
      timeout "${TESTS_TIMEOUT:-550}" "$python" -X faulthandler -m pytest -m gpu -q -p no:cacheprovider --rootdir "$tests" \
        --deselect test_soak.py::test_gpu_soak_of_twenty_thousand_decode_steps \
        $(for file in ${GPU_TESTS:-.}; do echo "$tests/$file"; done) \
        2>&1 | tee "$out/gpu_tests.log" || status=1 ;;
    decode)
      timeout "${DECODE_TIMEOUT:-240}" "$python" -m jax_vattention.app.cli bench decode --batch ${DECODE_BATCH:-16 64} \
        --context ${DECODE_CONTEXT:-2048 8192} --steps 8 --repeats 3 --out /tmp/bench_decode 2>&1 \
        | tee "$out/bench_decode.log" || status=1
      cp /tmp/bench_decode/decode.csv /tmp/bench_decode/decode.png "$out/" 2>/dev/null || true ;;
    alloc)
      timeout 60 "$python" -m jax_vattention.bench alloc 2>&1 | tee "$out/bench_alloc.log" || status=1 ;;
    generate)
      ( rc=0
        for backend in auto cudnn pallas; do
          timeout 90 "$python" -m jax_vattention.app.cli generate --backend "$backend" 2>&1 | tail -8 || rc=1
        done; exit $rc ) | tee "$out/generate.log" || status=1 ;;
    serve)
      # Serving at a fixed budget: the batch sustained against an ideal allocator's.
      ( rc=0
        for layout in ${SERVE_LAYOUTS:-per_layer interleaved}; do
          timeout 240 "$python" -m jax_vattention.app.cli serve-bench --config llama-3-8b --requests 64 --rate 40 \
            --prompt-len 64 700 --output-len 32 256 --max-batch 32 --max-len 1024 --budget-mib 1536 \
            --layout "$layout" --out "/tmp/serve_$layout" 2>&1 \
            | tr '\r' '\n' | last_progress || rc=1
          cp "/tmp/serve_$layout/mapped_memory.png" "$out/serve_$layout.png" 2>/dev/null || true
        done; exit $rc ) | tee "$out/serve.log" || status=1 ;;
    stall)
      ( rc=0
        for run in ${STALL_RUNS:-plain pipelined}; do
          echo "== engine $run"
          timeout 150 "$python" -m jax_vattention.app.cli serve-bench --config llama-3-8b --layout interleaved \
            --requests 128 --rate 100000 --prompt-len 64 700 --output-len 144 144 --max-batch 64 --max-len 1024 \
            --budget-mib 16384 $(case "$run" in plain*) echo --no-pipeline;; esac) \
            $(case "$run" in *profiled) echo --profile;; esac) --out "/tmp/stall_$run" 2>&1 \
            | tr '\r' '\n' | last_progress || rc=1
        done; exit $rc ) 2>&1 | tee "$out/stall.log" || status=1 ;;
    prefix)
      # Sharing on, then off, one workload and budget; the second run reuses the first one's compiles.
      # The GPU tests of prefix sharing: GPU_TESTS=test_gpu_prefix.py with the tests section.
      ( rc=0
        export JAX_COMPILATION_CACHE_DIR=/tmp/jax_prefix_cache
        for sharing in ${PREFIX_RUNS:-on off}; do
          flag=$([ "$sharing" = off ] && echo --no-prefix-sharing)
          echo "== prefix sharing $sharing"
          timeout 280 "$python" -m jax_vattention.app.cli serve-bench --config llama-3-8b --layout interleaved \
            --requests 128 --rate 64 --shared-prefix 1024 --prompt-len 32 256 --output-len 32 128 \
            --max-batch 64 --max-len 1536 --budget-mib 8192 $flag --out "/tmp/prefix_$sharing" 2>&1 \
            | tr '\r' '\n' | last_progress || rc=1
        done
        if [ -f /tmp/prefix_on/tokens.json ] && [ -f /tmp/prefix_off/tokens.json ]; then
          "$python" -c 'import json; on, off = (json.load(open(f"/tmp/prefix_{s}/tokens.json")) for s in ("on", "off"))
print(f"tokens identical with sharing on and off: {sum(a == b for a, b in zip(on, off))} of {len(off)} requests")' \
            || rc=1
        fi
        exit $rc ) 2>&1 | tee "$out/prefix.log" || status=1 ;;
    crossing)
      # A decode step that crosses a page against one that does not.
      ( rc=0
        for layout in ${CROSSING_LAYOUTS:-per_layer interleaved}; do
          timeout 120 "$python" -m jax_vattention.app.cli bench crossing --layout "$layout" || rc=1
          if [ -n "${CROSSING_NO_GRAPHS:-}" ]; then
            XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 120 "$python" -m jax_vattention.app.cli bench crossing \
              --layout "$layout" --modes premapped prefetched 2>&1 | sed -n '/^mode/,$p' \
              | sed 's/^/no CUDA graphs: /' || rc=1
          fi
        done; exit $rc ) 2>&1 | tee "$out/crossing.log" || status=1 ;;
    soak)
      timeout "${SOAK_TIMEOUT:-300}" "$python" -X faulthandler "$tests/soak_engine.py" --device gpu --steps "${SOAK_STEPS:-20000}" \
        --sample 24 2>&1 | tail -20 | tee "$out/soak.log" || status=1 ;;
    server)
      ( rc=1
        "$python" -m jax_vattention.app.cli serve --config tiny --max-len 512 --port 8765 > /tmp/server.log 2>&1 &
        server=$!
        for _ in $(seq 90); do curl -sf localhost:8765/health > /dev/null && rc=0 && break; sleep 1; done
        curl -sf localhost:8765/v1/completions -H 'Content-Type: application/json' \
          -d '{"model": "tiny", "prompt": "Hello", "max_tokens": 16, "temperature": 0}' || rc=1
        echo
        curl -sfN localhost:8765/v1/chat/completions -H 'Content-Type: application/json' \
          -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": true}' \
          | head -4 || rc=1
        kill $server; wait $server 2>/dev/null; tail -5 /tmp/server.log; exit $rc ) 2>&1 | tee "$out/server.log" \
        || status=1 ;;
    chat)
      ( rc=0
        for backend in pallas cudnn; do
          timeout 120 "$python" -m jax_vattention.app.cli generate --model smollm2-135m --backend "$backend" \
            --chat "What is the capital of France?" || rc=1
        done; exit $rc ) 2>&1 | tee "$out/chat.log" || status=1 ;;
    *) echo "unknown section: $section" >&2; status=1 ;;
  esac
done
exit $status
