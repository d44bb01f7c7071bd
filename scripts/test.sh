#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite: unit, snapshot, CLI, fuzz (bounded) and
# ptxas checks. GPU tests are opt-in (see docs/gpu-tests.md) and are not run here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
export CCC_PTXAS="${CCC_PTXAS:-$(ls "$PWD"/.venv/lib/python3*/site-packages/nvidia/cu13/bin/ptxas | head -1)}"
python3 -m unittest discover -s tests/python -t tests/python  # the Python loader's pure parts and its wheel (stdlib, pip)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --release 2>&1 | tee "$log"
# One closing line over every test binary (cargo's last line is a doc-test run that may hold none).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "cargo: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
