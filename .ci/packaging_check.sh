#!/usr/bin/env bash
# Every release artifact and every way of installing ends with the compiled kernels in use
# (docs/install.md). Run by .ci/run; by hand: `make packaging-check` (or bash .ci/packaging_check.sh).
#
# Builds the sdist (`make sdist`: python -m build, isolated, no torch) and the wheel (`make wheel`:
# gradstab._C built against .venv's torch), then installs them into fresh venvs that hold only
# torch, by each route:
#   sdist-pip          pip install gradstab-*.tar.gz                  (kernels compiled on first use)
#   sdist-no-isolation pip install --no-build-isolation gradstab-*.tar.gz  (kernels built at install)
#   wheel              pip install gradstab-*.whl                     (kernels built at install)
#   extra              pip install "<checkout>[demo]" over sdist-no-isolation: a pure-Python
#                      rebuild of gradstab, which must still end with kernels (compiled on first use)
# In each, tests/packaging_probe.py checks GradientStabilizer().backend == "cpu", how gradstab._C
# came to be, and that a few steps equal the torch backend's; it times the first import + apply.
# The routes share one compile cache (GRADSTAB_CACHE_DIR), so the first use compiles once; with
# SHARED_CACHE=0 every route gets its own (what a new user meets: for timing them).
#
# Environment: PYTHON (python3), TORCH_SPEC (torch==2.13.0), KEEP=1 keeps the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SHARED_CACHE=${SHARED_CACHE:-1}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gradstab-packaging.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "packaging-check: work folder $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset GRADSTAB_NO_EXTENSION GRADSTAB_NO_JIT GRADSTAB_NO_CUDA CXX
start_all=$(date +%s)

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
step() { echo "packaging-check: $*"; }
fail() { echo "packaging-check: FAILED: $*" >&2; exit 1; }

step "make sdist wheel"
make --no-print-directory sdist wheel > "$WORK/artifacts.log" 2>&1 || { cat "$WORK/artifacts.log"; fail "make sdist wheel"; }
sdist=$(ls dist/gradstab-*.tar.gz)
wheel=$(ls dist/gradstab-*.whl)

# The artifacts carry every source the build reads; the wheel carries gradstab._C and its record.
.venv/bin/python - "$sdist" "$wheel" <<'EOF' || fail "artifact contents"
import sys, tarfile, zipfile
sys.path.insert(0, ".")
from gradstab import _build
sources = _build.source_files(".")
with tarfile.open(sys.argv[1]) as tar:
    in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
in_wheel = set(zipfile.ZipFile(sys.argv[2]).namelist())
missing = sorted(set(sources) - in_sdist) + sorted(
    {f"gradstab/_csrc/{s}" for s in sources} - in_wheel
)
if not [n for n in in_wheel if n.startswith("gradstab/_C.") and n.endswith(".so")]:
    missing.append("gradstab/_C.*.so in the wheel")
if "gradstab/_C.json" not in in_wheel:
    missing.append("gradstab/_C.json in the wheel")
if missing:
    sys.exit(f"missing: {missing}")
print(f"packaging-check: sdist and wheel carry all {len(sources)} files of csrc/ and the wheel _C")
EOF

SUMMARY="$WORK/summary.md"
printf '| route | install (s) | first import + apply (s) | gradstab._C |\n|---|---:|---:|---|\n' > "$SUMMARY"

# fresh_venv NAME [packages...]: a venv holding only torch (and the given packages).
fresh_venv() {
  local venv=$WORK/$1
  shift
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet "$TORCH_SPEC" "$@" > "$WORK/venv-$(basename "$venv").log" 2>&1 \
    || { cat "$WORK/venv-$(basename "$venv").log"; fail "venv $venv"; }
}

# route NAME VENV ORIGIN -- pip install arguments...: install, then probe from outside the checkout.
route() {
  local name=$1 venv=$WORK/$2 origin=$3
  shift 4
  if [ "$SHARED_CACHE" = 1 ]; then export GRADSTAB_CACHE_DIR=$WORK/cache; else export GRADSTAB_CACHE_DIR=$WORK/cache-$name; fi
  local t0
  t0=$(now)
  (cd "$WORK" && "$venv/bin/pip" install --no-cache-dir "$@") > "$WORK/$name-install.log" 2>&1 \
    || { cat "$WORK/$name-install.log"; fail "$name: pip install $*"; }
  local install_s
  install_s=$(since "$t0")
  t0=$(now)
  (cd "$WORK" && "$venv/bin/python" "$ROOT/tests/packaging_probe.py" --backend cpu --origin "$origin") \
    > "$WORK/$name-probe.json" 2> "$WORK/$name-probe.err" \
    || { cat "$WORK/$name-probe.json" "$WORK/$name-probe.err"; fail "$name: first use"; }
  local use_s
  use_s=$(since "$t0")
  sed 's/^/    /' "$WORK/$name-probe.err"
  local extension
  extension=$("$venv/bin/python" -c "import json, sys; print(json.load(open(sys.argv[1]))['extension'])" "$WORK/$name-probe.json")
  step "$name: install ${install_s} s, first import + apply ${use_s} s: backend cpu, $extension"
  printf '| %s | %s | %s | %s |\n' "$name" "$install_s" "$use_s" "$extension" >> "$SUMMARY"
}

step "sdist, plain pip install (isolated build, no torch in it)"
fresh_venv sdist-pip
route sdist-pip sdist-pip first-use -- "$ROOT/$sdist"

step "sdist, pip install --no-build-isolation"
fresh_venv sdist-nbi "setuptools>=64" wheel ninja
route sdist-no-isolation sdist-nbi install -- --no-build-isolation "$ROOT/$sdist"

step "wheel from make wheel"
fresh_venv wheel
route wheel wheel install -- "$ROOT/$wheel"

step "an extra over the --no-build-isolation install: pip install \"<checkout>[demo]\""
route extra-demo sdist-nbi first-use -- "$ROOT[demo]" "matplotlib==3.10.9"

cat "$SUMMARY"
step "all routes end with the compiled kernels ($(( $(date +%s) - start_all )) s)"
