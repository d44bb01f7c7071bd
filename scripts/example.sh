#!/usr/bin/env bash
# Sets up (idempotent), builds the compiler and compiles the bundled ZAYA1 example into out/zaya1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
cargo build --release --bin ccc
./target/release/ccc explain examples/zaya1.attn
./target/release/ccc compile examples/zaya1.attn -o out   # writes out/zaya1/{manifest.json,zaya1.ptx}
ls -l out/zaya1
