#!/usr/bin/env bash
# The GPU check of gradstab, in one call of the device tool (see docs/cuda.md):
#   builds gradstab._C from source with the machine's torch and nvcc (sm_90 only, to be quick),
#   runs tests/test_cuda.py, then the CPU tests if time is left, then the GPU benchmark presets,
#   writes everything under $OUT and prints a short table last. Finishes in under 8 minutes: every
#   step runs under `timeout` against one deadline.
#
# Usage (from the repository root): OUT=/some/dir bash benchmarks/gpu_check.sh
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0),
#   GPU_CHECK_SECONDS (default 450), BENCH_REPEATS (default 7).
# Files under $OUT (at most 8): build.log, test_cuda.log, test_cpu.log, bench.md, bench.csv,
#   bench.json, env.json, summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out}
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a link outside the toolkit.
[[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]] && export CUDA_HOME=/usr/local/cuda
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-450}))
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"

# step NAME CAP_SECONDS LOG COMMAND...: runs COMMAND under the smaller of CAP and the time left.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((DEADLINE - SECONDS - 5))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    echo "| $name | not run: out of time | |" >>"$SUMMARY"
    return 1
  fi
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local status="ok"
  ((rc == 124 || rc == 137)) && status="timed out after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="failed (exit $rc)"
  echo "| $name | $status | $((SECONDS - start)) s |" >>"$SUMMARY"
  return $rc
}

# The last line of a pytest log: "N passed, M failed, ... in T s".
pytest_tally() {
  grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$1" | tail -1 | sed 's/=//g'
}

echo "| step | result | time |" >>"$SUMMARY"
echo "| --- | --- | --- |" >>"$SUMMARY"

step build 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace
built=$?
"$PY" - >"$OUT/env.json" 2>>"$OUT/build.log" <<'EOF'
import datetime, json, platform, subprocess
import torch
info = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "gpu_count": torch.cuda.device_count(),
}
try:
    info["driver"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as err:
    info["driver"] = f"nvidia-smi failed: {err}"
try:
    from gradstab import _C, _ops
    info["gradstab_build"] = _C.build_info()
    info["cuda_kernel_registered"] = _ops.has_kernel("cuda")
    info["cuda_adamw_kernel_registered"] = _ops.has_kernel("cuda", "stabilized_adamw_")
except Exception as err:  # noqa: BLE001 - recorded, not fatal
    info["gradstab_build"] = f"import failed: {err}"
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "unknown"
except (OSError, subprocess.SubprocessError):
    info["commit"] = "unknown"
print(json.dumps(info, indent=2))
EOF

if ! grep -q '"cuda_kernel_registered": true' "$OUT/env.json"; then
  echo "| CUDA kernel | NOT registered: the CUDA tests will skip | |" >>"$SUMMARY"
fi
if ((built == 0)); then
  step "tests/test_cuda.py" 200 "$OUT/test_cuda.log" \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda.py tests/test_cuda_plan.py \
    tests/test_cuda_adamw.py
  echo "| test_cuda tally | $(pytest_tally "$OUT/test_cuda.log") | |" >>"$SUMMARY"
  if [[ -f gradstab/bench.py ]]; then
    step "bench (gpt2-small, llama-1b, llama-7b, many-small, llama-*-adamw)" 170 "$OUT/bench.md" \
      "$PY" -m gradstab.bench --device cuda --preset gpt2-small --preset llama-1b \
      --preset llama-7b --preset many-small --preset llama-1b-adamw --preset llama-7b-adamw \
      --repeats "${BENCH_REPEATS:-7}" \
      --csv "$OUT/bench.csv" --json "$OUT/bench.json"
  else
    echo "| bench | not run: gradstab/bench.py is not in this tree | |" >>"$SUMMARY"
  fi
  step "CPU tests" 90 "$OUT/test_cpu.log" \
    "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_contract.py tests/test_op.py
  echo "| CPU tests tally | $(pytest_tally "$OUT/test_cpu.log") | |" >>"$SUMMARY"
fi

echo
echo "== gradstab GPU check: full logs, CSV and JSON under \$OUT =="
grep -E "FAILED|ERROR" "$OUT/test_cuda.log" 2>/dev/null | head -20
cat "$OUT/env.json"
# The benchmark's table rows (the markdown printed by gradstab.bench).
grep -E "^\|" "$OUT/bench.md" 2>/dev/null | head -30
cat "$SUMMARY"
