# Sourced by the device scripts (repo root, on the lent GPU machine) before their own steps: strict pipes,
# unbuffered Python, parallel extension builds, the OUT folder whose files come back, `stamp NAME` (seconds since
# the start), and the checkout installed in editable mode (its log in $OUT/install.log; the calling script stops
# if the install fails).
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "== $1: $(( $(date +%s) - t0 )) s"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
