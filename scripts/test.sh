#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite: unit, snapshot, CLI, fuzz (bounded) and
# ptxas checks. GPU tests are opt-in (see docs/gpu-tests.md) and are not run here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
export CCC_PTXAS="${CCC_PTXAS:-$(ls "$PWD"/.venv/lib/python3*/site-packages/nvidia/cu13/bin/ptxas | head -1)}"
python3 -m unittest discover -s tests/python -t tests/python  # the Python loader's pure parts (stdlib only)
cargo test --workspace --release
