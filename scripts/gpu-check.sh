#!/usr/bin/env bash
# GPU check for a lent CUDA machine (no cargo there): carry a release build, then
#   scripts/gpu-check.sh [BIN_DIR]        (default: target/release)
# Starts inferfluxd with --device cpu and --device cuda on the embedded model, sends every golden
# prompt greedily to both, and prints a table: tokens agreeing with transformers' greedy
# continuation, and wall time per request. The CUDA path computes in f16, so a late divergence
# from the f32 goldens on this random model is possible; an early one is a bug.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
declare -A pids
for dev in cpu cuda; do
  port=$([ "$dev" = cpu ] && echo 18181 || echo 18182)
  RUST_LOG=info "$bin/inferfluxd" --device "$dev" --port "$port" >"/tmp/inferflux-$dev.log" 2>&1 &
  pids[$dev]=$!
done
trap 'kill ${pids[cpu]} ${pids[cuda]} 2>/dev/null || true' EXIT
for port in 18181 18182; do
  for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
done
python3 - <<'PY'
import json, time, urllib.request
goldens = json.load(open("tests/fixtures/tiny-llama/goldens.json"))["prompts"]
def complete(port, prompt):
    body = json.dumps({"prompt": prompt, "max_tokens": 24, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    t = time.perf_counter()
    out = json.load(urllib.request.urlopen(req))
    return out["choices"][0]["text"], (time.perf_counter() - t) * 1000
def agree(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y: break
        n += 1
    return n
print(f"| prompt | cpu chars ok | cuda chars ok | cpu ms | cuda ms |")
print(f"|---|---|---|---|---|")
for g in goldens:
    complete(18182, g["prompt"])  # warm-up: NVRTC compiles kernels on first use
    c, tc = complete(18181, g["prompt"])
    d, td = complete(18182, g["prompt"])
    want = g["greedy_text"]
    print(f"| {g['prompt'][:24]!r} | {agree(c, want)}/{len(want)} | {agree(d, want)}/{len(want)} | {tc:.1f} | {td:.1f} |")
PY
grep -m1 "model loaded" /tmp/inferflux-cuda.log || tail -20 /tmp/inferflux-cuda.log
