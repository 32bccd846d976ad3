#!/usr/bin/env bash
# Format, then lint with warnings as errors (what review expects before a commit).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all
cargo clippy --release --all-targets -- -D warnings
