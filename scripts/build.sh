#!/usr/bin/env bash
# Release build of inferfluxd and inferctl: one binary carries the CPU (Flex) and CUDA backends.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins "$@"
ls -l target/release/inferfluxd target/release/inferctl
