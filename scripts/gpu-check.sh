#!/usr/bin/env bash
# GPU check for a lent CUDA machine (no cargo there): carry a release build, then
#   scripts/gpu-check.sh [BIN_DIR]        (default: target/release)
# For the embedded model and every architecture fixture (llama3, mistral, qwen2, qwen3), starts
# inferfluxd on each device in $DEVICES (default "cpu cuda"), sends every golden prompt greedily,
# and prints a table: characters agreeing with transformers' greedy continuation, and wall time
# per request. CUDA computes in f16/bf16, so a late divergence from the f32 goldens on these
# random models is possible; an early one is a bug. DEVICES=cpu runs it on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}
devices=${DEVICES:-cpu cuda}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
echo "| model | prompt | device | chars ok | ms |"
echo "|---|---|---|---|---|"
for model in embedded tiny-llama3 tiny-mistral tiny-qwen2 tiny-qwen3; do
  goldens=tests/fixtures/${model/embedded/tiny-llama}/goldens.json
  for dev in $devices; do
    port=18181
    args=(--device "$dev" --port "$port")
    [ "$model" != embedded ] && args+=(--model "tests/fixtures/$model")
    RUST_LOG=info "$bin/inferfluxd" "${args[@]}" >"/tmp/inferflux-$model-$dev.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
    MODEL=$model DEV=$dev GOLDENS=$goldens PORT=$port python3 - <<'PY'
import json, os, time, urllib.request
port, goldens = os.environ["PORT"], json.load(open(os.environ["GOLDENS"]))["prompts"]
def complete(prompt):
    body = json.dumps({"prompt": prompt, "max_tokens": 24, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    t = time.perf_counter()
    out = json.load(urllib.request.urlopen(req))
    return out["choices"][0]["text"], (time.perf_counter() - t) * 1000
complete(goldens[0]["prompt"])  # warm-up: NVRTC compiles kernels on first use
for g in goldens:
    got, ms = complete(g["prompt"])
    want = g["greedy_text"]
    ok = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    print(f"| {os.environ['MODEL']} | {g['prompt'][:20]!r} | {os.environ['DEV']} | {ok}/{len(want)} | {ms:.1f} |")
PY
    grep -m1 "model loaded" "/tmp/inferflux-$model-$dev.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-160 || tail -5 "/tmp/inferflux-$model-$dev.log"
    kill $pid 2>/dev/null; wait $pid 2>/dev/null || true
  done
done
