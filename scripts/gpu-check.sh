#!/usr/bin/env bash
# The GPU check, one call of at most 8 minutes on the lent machine (it has no cargo):
#   scripts/gpu-check.sh [BIN_DIR]
# BIN_DIR (default target/release) holds release builds made elsewhere of inferfluxd, inferctl and
# device_check (`cargo bench --bench device_check --no-run`); `NAME.xz` files are unpacked first.
# Results go to $OUT (default /tmp/gpu-check). Steps, each under a timeout so one stuck step
# still leaves the others' numbers:
#   1. device_check logits: CUDA (f16/bf16) logits and greedy tokens of every fixture against
#      the CPU f32 path and transformers' goldens;
#   2. a Llama-3.2-1B-shaped checkpoint with random bf16 weights, made here by transformers;
#   3. the baseline from the same call: copy bandwidth, cuBLAS time of one step's GEMMs, and
#      transformers `generate` tokens/s at batch 1, 32, 128 (prompt 128, output 128);
#   4. device_check profile: where InferFlux's decode step goes at batch 1, 32, 128;
#   5. inferfluxd on that checkpoint, `inferctl bench` at concurrency 1, 32, 128;
#   6. one table: InferFlux against the baseline and the memory roofline.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=$(cd "${1:-target/release}" && pwd)
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
for f in "$bin"/*.xz; do [ -e "$f" ] && xz -dkf "$f" && chmod +x "${f%.xz}"; done
t0=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Kernels compiled by NVRTC and autotune results are kept across this call's processes.
work=$(mktemp -d)
printf '[compilation]\ncache = "local"\n\n[autotune]\ncache = "local"\n' >"$work/cubecl.toml"
cd "$work"

stage "1. CUDA logits against the CPU f32 path and transformers"
timeout 150 "$bin/device_check" logits --device cuda $(ls -d "$repo"/tests/fixtures/*/ | sed 's:/$::' | while read -r d; do [ -f "$d/goldens.json" ] && echo "$d"; done) | tee "$out/logits.md"

stage "2. Llama-3.2-1B-shaped checkpoint (random bf16)"
model=$work/llama-1b
timeout 120 python3 "$repo/scripts/gpu_bench.py" make-model "$model"

stage "3. baseline: copy bandwidth, cuBLAS GEMMs, transformers generate"
timeout 150 python3 "$repo/scripts/gpu_bench.py" baseline "$model" --out "$out/baseline.json"
bw=$(python3 -c "import json; print(json.load(open('$out/baseline.json'))['copy_gbs'])" 2>/dev/null || echo 3000)

stage "4. where a decode step goes"
timeout 120 "$bin/device_check" profile --device cuda --model "$model" --batches 1,32,128 \
    --context 192 --iters 10 --bandwidth-gbs "$bw" --json "$out/profile.json"

stage "5. inferfluxd + inferctl bench"
port=18080
INFERFLUX__KV__NUM_PAGES=4096 INFERFLUX__SCHEDULER__MAX_RUNNING=128 \
INFERFLUX__SCHEDULER__MAX_BATCHED_TOKENS=2048 INFERFLUX__SCHEDULER__MAX_WAITING=4096 \
    "$bin/inferfluxd" --device cuda --model "$model" --port "$port" >"$out/inferfluxd.log" 2>&1 &
server=$!
for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
grep -m1 "model loaded" "$out/inferfluxd.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300
url=http://127.0.0.1:$port
bench() { "$bin/inferctl" bench --url "$url" --input-len 128 "$@"; }
# Compiles and autotunes the kernels of every batch size the runs below will see.
timeout 90 bench --num-prompts 128 --concurrency 128 --output-len 8 --warmup 1 >/dev/null
for c in 1 32 128; do
    n=$(( c == 1 ? 4 : 2 * c ))
    timeout 100 bench --num-prompts "$n" --concurrency "$c" --output-len 128 --json >"$out/bench-c$c.json" \
        && echo "concurrency $c: $(head -c 300 "$out/bench-c$c.json")" || echo "concurrency $c: FAILED or timed out"
done
curl -s "$url/metrics" | grep -E "^inferflux_step_duration_seconds_(sum|count)" || true
kill "$server" 2>/dev/null; wait "$server" 2>/dev/null

stage "6. summary"
python3 "$repo/scripts/gpu_bench.py" table --baseline "$out/baseline.json" --bench-dir "$out" \
    --profile "$out/profile.json" | tee "$out/summary.md"
echo "gpu-check took $(( $(date +%s) - t0 )) s"
