#!/usr/bin/env bash
# Every test, Python clients included: creates target/py-venv once, installs the pinned
# tests/python/requirements.txt into it (quiet, and quick when already met), points
# INFERFLUX_PYTHON at it, then runs `cargo test --release` with this script's arguments
# (`scripts/test.sh openai` runs one label).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/py-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
export INFERFLUX_PYTHON="$PWD/$venv/bin/python"
exec cargo test --release "$@"
