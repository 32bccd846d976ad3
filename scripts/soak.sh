#!/usr/bin/env bash
# Soak test: starts target/release/inferfluxd on the embedded model on a free loopback port and
# runs scripts/soak.py against it (many concurrent streaming clients with random disconnects,
# admin cancels and bad requests), bounded in time and request count. Prints one summary line;
# exits non-zero on any failure (malformed response, 5xx, leaked KV pages, RSS growth, no /health).
#   scripts/soak.sh [--duration SECONDS] [--max-requests N] [--concurrency N] [--seed N]
# Python: INFERFLUX_PYTHON, else target/py-venv (scripts/test.sh creates it).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/inferfluxd
if [ ! -x "$bin" ]; then
    cargo build --release --bin inferfluxd
fi
python="${INFERFLUX_PYTHON:-$PWD/target/py-venv/bin/python}"
if [ ! -x "$python" ]; then
    echo "soak: no Python with tests/python/requirements.txt; run scripts/test.sh once or set INFERFLUX_PYTHON" >&2
    exit 2
fi
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -t inferflux-soak.XXXXXX.log)
INFERFLUX__LOG__LEVEL=warn "$bin" --host 127.0.0.1 --port "$port" --device cpu >"$log" 2>&1 &
pid=$!
cleanup() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
trap cleanup EXIT
base="http://127.0.0.1:$port"
for _ in $(seq 1 300); do
    if "$python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=1)" "$base" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "soak: the server exited at start:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.2
done
status=0
"$python" scripts/soak.py --base "$base" --pid "$pid" "$@" || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
    echo "soak: the server died during the run" >&2
    status=1
fi
if [ "$status" -ne 0 ]; then
    echo "soak: server log ($log), last lines:" >&2
    tail -n 40 "$log" >&2
fi
exit "$status"
