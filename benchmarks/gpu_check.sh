#!/usr/bin/env bash
# The GPU check of gradstab, in one call of the device tool (see docs/cuda.md), in this order:
#   1. build gradstab._C in place from source with the machine's torch and nvcc (sm_90 only, to
#      be quick; no network needed: the machine's python must have torch, setuptools, ninja);
#   2. python -m gradstab check --device cuda: the self-check a user runs on a new GPU;
#   3. the CUDA tests (tests/test_cuda*.py; pytest must be installed);
#   4. the GPU benchmark presets (python -m gradstab.bench --device cuda);
# every step under `timeout` against one deadline (default 500 s, inside a 9-minute call), its
# output under $OUT, and a short summary printed last.
#
# Usage (from the repository root): OUT=/some/dir bash benchmarks/gpu_check.sh
#   with the device tool: run(command="OUT=$OUT bash benchmarks/gpu_check.sh", timeout_s=540)
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0),
#   GPU_CHECK_SECONDS (default 500), BENCH_REPEATS (default 7).
# Files under $OUT (8, the most the device tool brings back): build.log, env.json, check.md,
#   test_cuda.log, bench.md, bench.csv, bench.json, summary.md.
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
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-500}))
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

# What the steps below rely on, said up front (the machine has no network to install from).
"$PY" - >>"$OUT/build.log" 2>&1 <<'EOF'
import importlib.util
missing = [m for m in ("torch", "setuptools", "ninja", "pytest", "numpy")
           if importlib.util.find_spec(m) is None]
print("python modules missing:", missing or "none")
EOF

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
  echo "| CUDA kernel | NOT registered: the check and the CUDA tests cannot run | |" >>"$SUMMARY"
fi
if ((built == 0)); then
  step "python -m gradstab check --device cuda" 90 "$OUT/check.md" \
    "$PY" -m gradstab check --device cuda
  echo "| check | $(grep -E "checks (passed|FAILED)|^gradstab check:" "$OUT/check.md" | tail -1) | |" >>"$SUMMARY"
  # A test that hangs (a kernel that never finishes) fails alone if pytest-timeout is there.
  per_test=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=90)
  step "tests/test_cuda*.py" 200 "$OUT/test_cuda.log" \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider ${per_test[@]+"${per_test[@]}"} tests/test_cuda.py \
    tests/test_cuda_adamw.py tests/test_cuda_plan.py tests/test_cuda_shared_math.py
  echo "| test_cuda tally | $(pytest_tally "$OUT/test_cuda.log") | |" >>"$SUMMARY"
  step "bench (gpt2-small, llama-1b, llama-7b, many-small, llama-*-adamw)" 150 "$OUT/bench.md" \
    "$PY" -m gradstab.bench --device cuda --preset gpt2-small --preset llama-1b \
    --preset llama-7b --preset many-small --preset llama-1b-adamw --preset llama-7b-adamw \
    --repeats "${BENCH_REPEATS:-7}" --csv "$OUT/bench.csv" --json "$OUT/bench.json"
fi

echo
echo "== gradstab GPU check: full logs, CSV and JSON under \$OUT =="
tail -5 "$OUT/build.log"
cat "$OUT/env.json"
grep -E "^\||checks (passed|FAILED)|^gradstab .* check on" "$OUT/check.md" 2>/dev/null
grep -E "FAILED|ERROR" "$OUT/test_cuda.log" 2>/dev/null | head -30
# The benchmark's table rows (the markdown printed by gradstab.bench).
grep -E "^\|" "$OUT/bench.md" 2>/dev/null | head -30
cat "$SUMMARY"
