#!/usr/bin/env bash
# The GPU check, one call of at most 8 minutes on the lent machine (it has no cargo):
#   scripts/gpu-check.sh [BIN_DIR]
# BIN_DIR (default target/release) holds release builds made elsewhere of inferfluxd, inferctl and
# device_check (`cargo bench --bench device_check --no-run`); `NAME.xz` files are unpacked first.
# Results go to $OUT (default /tmp/gpu-check). STAGES=1256 runs only those steps, in that order, DEVICE=cpu runs
# steps 1, 4, 5, 6, 7, 8 and y on the CPU backend (a dry run anywhere, e.g. STAGES=145786y, on the
# tiny fixture with its context raised; steps 2, 3 need PyTorch on a GPU, step 6 prints InferFlux's
# numbers alone without step 3's baseline, and MODEL=DIR skips step 2 with a checkpoint of one's
# own). Steps, each under a timeout so one stuck step still leaves the others' numbers:
#   1. device_check logits: CUDA (f16/bf16) logits and greedy tokens of every fixture against
#      the CPU f32 path and transformers' goldens;
#   2. a Llama-3.2-1B-shaped checkpoint with random bf16 weights, made here by transformers;
#   3. the baseline from the same call: copy bandwidth, cuBLAS time of one step's GEMMs, and
#      transformers `generate` tokens/s at batch 1, 32, 128 (prompt 128, output 128);
#   4. device_check profile: where InferFlux's decode step goes at batch 1, 32, 128, and the host's
#      time per upload (a step's index arrays apart and in one upload), per launch and per read,
#      and per launch the calling thread's part alone (12 launches after a sync, within cubecl's
#      32-task buffer): near the 200-in-a-row figure, the caller binds; far below, cubecl's runner;
#      our RMSNorm's output carved from a block, then allocated on its own (an allocation's cost);
#      burn's select and our gather of one embedding row (a launch binding tensors, whose shapes
#      and strides cubecl-cuda uploads at every launch, against one binding arrays);
#   5. inferfluxd on that checkpoint, `inferctl bench` at concurrency 1, 32, 128;
#   6. one table: InferFlux against the baseline and the memory roofline (and one for step 8);
#   7. device_check gemm: every projection kernel of src/model/cuda_gemm.rs on the checkpoint's
#      shapes, both weight layouts, at 1, 8, 32 and 128 rows; writes the fastest `[cuda]` settings;
#   8. step 5 again with step 7's settings (INFERFLUX__CUDA__*), the paged attention kernel, the
#      fused operations, the fused K/V write and the argmax kernel (ATTENTION=burn, FUSED_OPS=false,
#      FUSED_KV_WRITE=false, DEVICE_ARGMAX=false leave them out), then step 4's profile with
#      them; results under $OUT/tuned;
#   9. device_check logits with InferFlux's own kernels (the `gemv` projections on `out_in`
#      weights, paged decode attention, fused ops) against the CPU f32 path and the goldens;
#   0. step 8's profile alone (no server): the decode step with step 8's kernels;
#   k. GPU time per kernel kind in a decode step at batch 1 and 128 (cubecl's profiler);
#   n. the decode step at batch 1 and 8 with the defaults, with the norms inside the GEMVs
#      (`fused_norm_gemv`, off by default until this measures it) and with every kernel output
#      allocated on its own (`carve_outputs = false`), alternated;
#   a. the decode step at context 2048 (batch 1 and 8) without and with the split paged attention
#      (`split_attention`: partitions of a long context on cubes of their own), alternated;
#   t. the skinny GEMM's plan knobs (`[cuda.skinny]`, SKINNY_TUNINGS) at 32 and 128 rows;
#   s. temperature-1 requests at concurrency 128 with step 8's kernels, sampled on the host and
#      then on the device (`device_sampling`), to measure the draw kernel; SAMPLING_CUTS="--top-p
#      0.9 --top-k 50" measures the cut draws (top-k/top-p/min-p bisected on the device);
#   y. one step at a time, async scheduling (`scheduler.async_scheduling`) and async scheduling with
#      overlapped steps (`scheduler.overlap_steps = on`) at concurrency 128 with
#      step 8's kernels, alternated, two runs each (about 120 s);
#   c. greedy tokens and logprobs of the served 1B checkpoint against transformers (bf16, same
#      GPU), with burn's kernels, the defaults, overlap (the defaults with `scheduler.overlap_steps
#      = on`: decodes fed from the previous step's ids on the device), `gemm = "skinny"` (our tensor-core GEMM: prompts
#      of 9-128 tokens go through it), norm-gemv (`fused_norm_gemv`: decodes' norms inside the
#      q/k/v and gate/up GEMVs, the attention's RoPE and K/V write in the q/k/v GEMV's epilogue)
#      and the defaults with burn's argmax (no-argmax); each also
#      teacher-forced, one token at every position of transformers' continuation, where a
#      flipped argmax must be a near-tie (step 1 failed on the tiny fixtures on CUDA whatever the
#      kernels until a step without logits stopped running the head on zero rows; see
#      docs/Performance.md). CHECK_KERNELS picks the configurations, also from
#      `ordered` (`gemm = "cublas-ordered"`), `sampling` (`device_sampling`, whose draws at
#      T=1e-4 must follow the greedy tokens; both checked correct on 2026-11-27) and no-paged,
#      no-kv-write, no-fused, no-gemv, no-argmax, no-gate-up and no-split (the defaults without one of our
#      kernels each; the defaults' gate/up GEMV with its activation is new since 2026-11-27), and
#      norm-gemv-apart (norm-gemv with q/k/v apart: only the MLP's norm inside its GEMV).
# GEMM_BUDGET_S (default 90) bounds step 7's timing. KERNELS=FILE runs steps 8 and 0 with the
# INFERFLUX__CUDA__* lines of FILE instead.
# The default order (29c7835614) fits steps 2 to 9 in about 8 minutes; 1 and 4 come last and may
# not fit: STAGES=14 runs them in a call of their own. A session's 15 minutes of device time count
# the machine's start (a minute or more) and its idle waits too, so two calls on one warm machine
# (the second at once, within its 30 s idle release) is all a session gets:
#   OUT=/tmp/x MODEL=/tmp/llama-1b STAGES=2c7y8 scripts/gpu-check.sh BIN_DIR  (about 510 s)
#   OUT=/tmp/x MODEL=/tmp/llama-1b STAGES=316n scripts/gpu-check.sh BIN_DIR  (about 280 s; give it a
#   timeout_s of what the session has left, less a minute)
# The first checks every default against transformers (c), picks the projections (7), measures the
# step loops (y, before step 8 so that a cut call still measures it) and serves (8); the second
# measures the baseline of the same machine (3), checks the fixtures' logits against the CPU (1,
# never passed on CUDA before the fix of 2026-11-28), prints the table (6) and times the norms
# inside the GEMVs and the outputs carved from blocks (n). Then give the machine back. Steps s,
# k, a and t go to a later session, with
# KERNELS=FILE holding the INFERFLUX__CUDA__* lines step 7 chose (recorded in docs/Performance.md):
#   OUT=/tmp/x STAGES=2ska scripts/gpu-check.sh BIN_DIR  (about 300 s) and, if the skinny GEMM
#   passed step 7, STAGES=t (about 150 s), which tries its plan knobs.
# (MODEL outside the call's temporary directory and the same OUT, so the second finds both.)
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=$(cd "${1:-target/release}" && pwd)
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
for f in "$bin"/*.xz; do [ -e "$f" ] && xz -dkf "$f" && chmod +x "${f%.xz}"; done
t0=$(date +%s)
stages=${STAGES:-29c7835614}
device=${DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Kernels compiled by NVRTC and autotune results are kept across this call's processes.
work=$(mktemp -d)
printf '[compilation]\ncache = "local"\n\n[autotune]\ncache = "local"\n' >"$work/cubecl.toml"
cd "$work"
model=${MODEL:-$work/llama-1b}
if [ "$device" = cpu ] && [ -z "${MODEL:-}" ]; then
    # A dry run without PyTorch: the tiny fixture, its context raised from 256 to 2,048 tokens so
    # that steps 5, 8 and y serve their 128 random words (about 740 tokens of its 384-word vocab).
    # Its weights and RoPE do not depend on the limit.
    model=$work/dry-model
    cp -r "$repo/tests/fixtures/tiny-llama" "$model"
    sed -i 's/"max_position_embeddings": 256/"max_position_embeddings": 2048/' "$model/config.json"
    sed -i 's/"model_max_length": 256/"model_max_length": 2048/' "$model/tokenizer_config.json"
fi
# The copy bandwidth (GB/s) of the rooflines until step 3 measures it (or an earlier call of the
# same OUT did): as measured on the lent machines, an H100 about 3,000 and an H200 about 4,300; BW=
# sets it.
case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)" in
*H200*) bw=${BW:-4300} ;;
*) bw=${BW:-3000} ;;
esac
# `measured_bw`: the copy bandwidth step 3 wrote into $out/baseline.json, when it did.
measured_bw() {
    [ -f "$out/baseline.json" ] &&
        bw=$(python3 -c "import json; print(json.load(open('$out/baseline.json'))['copy_gbs'])" 2>/dev/null || echo "$bw")
}
measured_bw

step1() { # CUDA logits against the CPU f32 path and transformers
    fixtures=$(for d in "$repo"/tests/fixtures/*/; do [ -f "$d/goldens.json" ] && echo "${d%/}"; done)
    # shellcheck disable=SC2086
    timeout 100 "$bin/device_check" logits --device "$device" $fixtures | tee "$out/logits.md"
    # PIPESTATUS[0]: device_check's status, not tee's.
    if [ "${PIPESTATUS[0]}" != 0 ] && [ "$device" = cuda ]; then
        echo "without burn's fusion layer (tells a fusion bug from ours):"
        # shellcheck disable=SC2086
        timeout 60 "$bin/device_check" logits --device cuda-nofusion $fixtures | tee "$out/logits-nofusion.md"
    fi
}

step2() { # Llama-3.2-1B-shaped checkpoint (random bf16)
    timeout 90 python3 "$repo/scripts/gpu_bench.py" make-model "$model"
}

step3() { # baseline: copy bandwidth, cuBLAS GEMMs, transformers generate
    timeout 100 python3 "$repo/scripts/gpu_bench.py" baseline "$model" --out "$out/baseline.json"
    measured_bw
}

step4() { # where a decode step goes
    profile() {
        timeout "$3" "$bin/device_check" profile --device "$1" --model "$model" --batches 1,32,128 \
            --context 192 --iters 10 --bandwidth-gbs "$bw" --json "$2"
    }
    profile "$device" "$out/profile.json" 60
    if [ "$device" = cuda ]; then
        echo "without burn's fusion layer:"
        profile cuda-nofusion "$out/profile-nofusion.json" 45
    fi
}

step5() { # inferfluxd + inferctl bench
    serve_bench "$out"
}

# `start_server DIR [ENV_FILE]`: inferfluxd on the checkpoint (with ENV_FILE's INFERFLUX__*
# settings), its log in DIR; sets `server` (the pid) and `url`, and returns once it answers.
start_server() {
    local dir=$1 port=18080
    url=http://127.0.0.1:$port
    mkdir -p "$dir"
    (
        [ -n "${2:-}" ] && set -a && . "$2" && set +a
        export INFERFLUX__KV__NUM_PAGES=4096 INFERFLUX__SCHEDULER__MAX_RUNNING=128 \
            INFERFLUX__SCHEDULER__MAX_BATCHED_TOKENS=2048 INFERFLUX__SCHEDULER__MAX_WAITING=4096
        exec "$bin/inferfluxd" --device "$device" --model "$model" --port "$port"
    ) >"$dir/inferfluxd.log" 2>&1 &
    server=$!
    for _ in $(seq 1 180); do curl -sf "$url/health" >/dev/null && break; sleep 0.5; done
    grep -m1 -E "model loaded|chosen kernels" "$dir/inferfluxd.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300
}

stop_server() {
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
}

# `bench N CONCURRENCY OUTPUT_LEN SECONDS [WARMUP]`: `inferctl bench` (JSON) against the running
# server, prompts of 128 random words (tokens), new ones for every run so that none hits the prefix
# cache.
bench() {
    local prompts=$work/prompts-$2-$3.jsonl
    python3 "$repo/scripts/gpu_bench.py" prompts "$prompts" $(($1 + 1)) "$2$3"
    timeout "$4" "$bin/inferctl" --url "$url" bench --dataset "$prompts" --num-prompts "$1" \
        --concurrency "$2" --output-len "$3" --warmup "${5:-1}" --json
}

# The executor's own step time (sum and count of inferflux_step_duration_seconds), and its two
# parts on rank 0 (issuing the forward pass, then waiting for the device and reading the ids
# back): taken around a run, against the TPOT, what the serving loop adds outside the model's
# step, and against `device_check profile`, what the executor adds around it.
step_metric() {
    curl -s "$url/metrics" | awk '
        /^inferflux_step_duration_seconds_sum/ {s=$2} /^inferflux_step_duration_seconds_count/ {c=$2}
        /^inferflux_step_issue_seconds_sum/ {i=$2} /^inferflux_step_read_seconds_sum/ {r=$2}
        /^inferflux_step_read_seconds_count/ {n=$2}
        END {print s+0, c+0, i+0, r+0, n+0}'
}

# `serve_bench DIR [ENV_FILE]`: inferfluxd (with ENV_FILE's INFERFLUX__* settings) and the benches,
# results in DIR.
serve_bench() {
    local dir=$1
    start_server "$dir" "${2:-}"
    # Compiles and autotunes the kernels of the batch sizes the runs below will see.
    bench 128 128 8 60 >/dev/null || echo "warm-up: FAILED or timed out"
    for c in 1 32 128; do
        read -r s0 n0 i0 r0 m0 <<<"$(step_metric)"
        # The first run compiled the kernels; a warm-up request of its own (at batch 1) would
        # only skew the executor's means at 32 and 128.
        if bench $(( c == 1 ? 2 : c )) "$c" 128 $(( c == 1 ? 45 : 70 )) $(( c == 1 ? 1 : 0 )) >"$dir/bench-c$c.json"; then
            read -r s1 n1 i1 r1 m1 <<<"$(step_metric)"
            echo "concurrency $c: executor steps $((n1 - n0)), mean $(python3 -c "
m = max($m1 - $m0, 1)
print(f'{($s1 - $s0) * 1e3 / max($n1 - $n0, 1):.2f} ms (issue {($i1 - $i0) * 1e3 / m:.2f}, wait and read {($r1 - $r0) * 1e3 / m:.2f})')"); $(head -c 400 "$dir/bench-c$c.json")"
        else
            echo "concurrency $c: FAILED or timed out"
        fi
    done
    stop_server
    tail -3 "$dir/inferfluxd.log"
    # Inputs our kernels had to copy (one line per call site, with shape and strides).
    grep "copied to be contiguous" "$dir/inferfluxd.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300
}

stepc() { # greedy tokens and logprobs against transformers on the 1B checkpoint, burn's kernels and the defaults
    [ "$device" = cuda ] || { echo "(CUDA only: the CPU path is checked against the goldens by cargo test)"; return; }
    timeout 90 python3 "$repo/scripts/gpu_bench.py" reference "$model" --out "$out/reference.json" || return
    printf 'INFERFLUX__CUDA__GEMM=burn\nINFERFLUX__CUDA__GEMV=burn\nINFERFLUX__CUDA__WEIGHT_LAYOUT=in_out\nINFERFLUX__CUDA__ATTENTION=burn\nINFERFLUX__CUDA__FUSED_OPS=false\nINFERFLUX__CUDA__DEVICE_ARGMAX=false\n' \
        >"$work/burn.env"
    : >"$work/defaults.env"
    echo "INFERFLUX__CUDA__GEMM=cublas-ordered" >"$work/ordered.env"
    echo "INFERFLUX__CUDA__GEMM=skinny" >"$work/skinny.env"
    echo "INFERFLUX__CUDA__DEVICE_SAMPLING=true" >"$work/sampling.env"
    # Overlapped steps: decodes fed from the previous step's ids on the device.
    echo "INFERFLUX__SCHEDULER__OVERLAP_STEPS=on" >"$work/overlap.env"
    # Bisection: the defaults without one of our kernels each.
    echo "INFERFLUX__CUDA__ATTENTION=burn" >"$work/no-paged.env"
    echo "INFERFLUX__CUDA__FUSED_KV_WRITE=false" >"$work/no-kv-write.env"
    echo "INFERFLUX__CUDA__FUSED_OPS=false" >"$work/no-fused.env"
    printf 'INFERFLUX__CUDA__GEMV=burn\nINFERFLUX__CUDA__WEIGHT_LAYOUT=in_out\n' >"$work/no-gemv.env"
    echo "INFERFLUX__CUDA__DEVICE_ARGMAX=false" >"$work/no-argmax.env"
    echo "INFERFLUX__CUDA__FUSED_GATE_UP=false" >"$work/no-gate-up.env"
    echo "INFERFLUX__CUDA__SPLIT_ATTENTION=false" >"$work/no-split.env"
    echo "INFERFLUX__CUDA__FUSED_NORM_GEMV=true" >"$work/norm-gemv.env"
    # Its bisection: q/k/v apart, so only the MLP's norm runs inside a GEMV (no RoPE epilogue).
    printf 'INFERFLUX__CUDA__FUSED_NORM_GEMV=true\nINFERFLUX__CUDA__FUSED_KV_WRITE=false\n' >"$work/norm-gemv-apart.env"
    {
        echo "| kernels | prompt | greedy tokens = transformers | max logprob diff |"
        echo "|---|---|---:|---:|"
        for kernels in ${CHECK_KERNELS:-burn defaults overlap skinny norm-gemv no-argmax}; do
            start_server "$out/check-$kernels" "$work/$kernels.env" >/dev/null
            python3 "$repo/scripts/gpu_bench.py" compare "$url" "$out/reference.json" "$kernels" ||
                echo "| $kernels | FAILED: a first token differs or a request failed | | |"
            python3 "$repo/scripts/gpu_bench.py" teacher-forced "$url" "$out/reference.json" "$kernels" ||
                echo "| $kernels | FAILED: teacher-forced | | |"
            # A kernel that cannot run falls back to burn's matmul, which would pass the check.
            grep -E "GEMM kernel refused|fused kernel refused" "$out/check-$kernels/inferfluxd.log" |
                sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | head -3
            if [ "$kernels" = sampling ]; then
                python3 "$repo/scripts/gpu_bench.py" draws "$url" "$out/reference.json" "$kernels" ||
                    echo "| $kernels | FAILED: device draws | | |"
                grep -c "device draw failed" "$out/check-$kernels/inferfluxd.log" | sed 's/^/device draw failures logged: /'
            fi
            stop_server
        done
    } | tee "$out/check.md"
}

step6() { # summary
    python3 "$repo/scripts/gpu_bench.py" table --baseline "$out/baseline.json" --bench-dir "$out" \
        --profile "$out/profile.json" | tee "$out/summary.md"
    if [ -d "$out/tuned" ]; then
        echo "with the [cuda] settings of step 8 ($(tr '\n' ' ' <"$out/tuned/kernels.env")):"
        python3 "$repo/scripts/gpu_bench.py" table --baseline "$out/baseline.json" --bench-dir "$out/tuned" \
            --profile "$out/tuned/profile.json" | tee "$out/summary-tuned.md"
    fi
}

step7() { # every projection kernel on the checkpoint's shapes
    # cubek's unit and unit-GEMV kernels, 10-1000x slower than the rest on these shapes, are
    # left out so that the budget reaches 128 rows; GEMM_KERNELS=all times them too.
    timeout $((${GEMM_BUDGET_S:-90} + 30)) "$bin/device_check" gemm --device "$device" --model "$model" --rows 1,8,32,128 \
        --kernels "${GEMM_KERNELS:-burn,cublas,skinny,gemv,cublas-ordered,mma,cmma,vecmat,gemv-plane}" --budget-s "${GEMM_BUDGET_S:-90}" \
        --json "$out/gemm.json" --recommend "$out/gemm.env" | tee "$out/gemm.md"
}

# `tuned_kernels`: $out/tuned/kernels.env from step 7's choice (or KERNELS), paged attention and
# the fused operations; false when there is no choice yet.
tuned_kernels() {
    local env=${KERNELS:-$out/gemm.env}
    [ -f "$env" ] || { echo "(no $env: run step 7 first)"; return 1; }
    mkdir -p "$out/tuned" && grep '^INFERFLUX__CUDA__' "$env" >"$out/tuned/kernels.env"
    grep -q '^INFERFLUX__CUDA__ATTENTION=' "$out/tuned/kernels.env" ||
        echo "INFERFLUX__CUDA__ATTENTION=${ATTENTION:-paged}" >>"$out/tuned/kernels.env"
    grep -q '^INFERFLUX__CUDA__FUSED_OPS=' "$out/tuned/kernels.env" ||
        echo "INFERFLUX__CUDA__FUSED_OPS=${FUSED_OPS:-true}" >>"$out/tuned/kernels.env"
    grep -q '^INFERFLUX__CUDA__FUSED_KV_WRITE=' "$out/tuned/kernels.env" ||
        echo "INFERFLUX__CUDA__FUSED_KV_WRITE=${FUSED_KV_WRITE:-true}" >>"$out/tuned/kernels.env"
    grep -q '^INFERFLUX__CUDA__DEVICE_ARGMAX=' "$out/tuned/kernels.env" ||
        echo "INFERFLUX__CUDA__DEVICE_ARGMAX=${DEVICE_ARGMAX:-true}" >>"$out/tuned/kernels.env"
    cat "$out/tuned/kernels.env"
}

step8() { # step 5 with step 7's kernels
    tuned_kernels || return
    serve_bench "$out/tuned" "$out/tuned/kernels.env"
    step0
}

step0() { # step 4's profile with step 8's kernels, without the server
    [ -f "$out/tuned/kernels.env" ] || tuned_kernels || return
    echo "the decode step with these kernels:"
    (
        set -a && . "$out/tuned/kernels.env" && set +a
        timeout 60 "$bin/device_check" profile --device "$device" --model "$model" --batches 1,32,128 \
            --context 192 --iters 10 --bandwidth-gbs "$bw" --json "$out/tuned/profile.json"
        # Does the step grow with the KV pool? One H100 call suggested so, but two runs with the
        # same pool differed as much (docs/Performance.md): the server's 4,096 pages against only
        # those the batch uses, alternated, two runs each with the one above.
        for pages in 4096 0 4096; do
            echo "$pages KV pages (0: only those the batch uses):"
            timeout 45 "$bin/device_check" profile --device "$device" --model "$model" --batches 1,128 \
                --context 192 --iters 20 --pages "$pages" --step-only 2>&1 | grep -E "^batch"
        done
    )
}

step9() { # our own kernels (gemv, paged attention, fused ops) against the CPU f32 path and transformers
    [ "$device" = cuda ] || { echo "(CUDA only: the kernels run on the CPU in cargo test)"; return; }
    # The server's default kernels. One process per fixture: a failed launch leaves cubecl's CUDA
    # server unusable for the rest of its process. The first fixture that fails runs again with
    # fewer of them, to name the culprit.
    local all=(INFERFLUX__CUDA__GEMV=gemv INFERFLUX__CUDA__WEIGHT_LAYOUT=out_in INFERFLUX__CUDA__GEMM=cublas
        INFERFLUX__CUDA__ATTENTION=paged INFERFLUX__CUDA__FUSED_OPS=true INFERFLUX__CUDA__FUSED_KV_WRITE=true) bisected=
    for d in "$repo"/tests/fixtures/*/; do
        [ -f "$d/goldens.json" ] || continue
        if env "${all[@]}" timeout 60 "$bin/device_check" logits --device cuda-kernels "${d%/}" \
            >"$work/logits.txt" 2>&1; then
            grep '^|' "$work/logits.txt" | tail -n +3 | tee -a "$out/logits-kernels.md"
            continue
        fi
        echo "$(basename "$d"): FAILED: $(grep -m1 -E "CUDA_ERROR|panicked|FAILED" "$work/logits.txt" | cut -c1-160)" |
            tee -a "$out/logits-kernels.md"
        grep '^|' "$work/logits.txt" | tail -n +3
        [ -n "$bisected" ] && continue
        bisected=1
        for only in "${all[*]/INFERFLUX__CUDA__GEMM=cublas/}" INFERFLUX__CUDA__GEMM=cublas none fusion; do
            local dev=cuda-kernels vars=$only
            case $only in none) dev=cuda-nofusion vars= ;; fusion) dev=cuda vars= ;; esac
            # shellcheck disable=SC2086
            if env $vars timeout 60 "$bin/device_check" logits --device "$dev" "${d%/}" >"$work/one.txt" 2>&1; then
                echo "  $only: passes: $(grep '^|' "$work/one.txt" | tail -1)"
            else
                echo "  $only: FAILS: $(grep -m1 -E "CUDA_ERROR|panicked|FAILED" "$work/one.txt" | cut -c1-160)"
            fi
        done | tee -a "$out/logits-kernels.md"
        # cubecl logs each kernel it runs: the last ones name the launch that fails.
        mkdir -p "$work/exec-log"
        printf '[profiling.logger]\nlevel = "minimal"\nfile = "%s"\n' "$out/failing-launch.log" >"$work/exec-log/cubecl.toml"
        (cd "$work/exec-log" && env "${all[@]}" timeout 60 "$bin/device_check" logits --device cuda-kernels "${d%/}" >/dev/null 2>&1)
        echo "  the last kernels run before it failed:"
        tail -6 "$out/failing-launch.log" 2>/dev/null | cut -c1-220
    done
}

steps() { # temperature sampling served: on the host against on the device (device_sampling)
    [ "$device" = cuda ] || { echo "(CUDA only)"; return; }
    [ -f "$out/tuned/kernels.env" ] || tuned_kernels || return
    # SAMPLING_CUTS adds warpers to every request, e.g. "--top-p 0.9 --top-k 50": the host sorts
    # each row for them, the device bisects (kernels/sample.rs).
    local cuts=${SAMPLING_CUTS:-}
    for where in host device; do
        local env=$work/sampling-$where.env
        grep -v '^INFERFLUX__CUDA__DEVICE_SAMPLING=' "$out/tuned/kernels.env" >"$env"
        echo "INFERFLUX__CUDA__DEVICE_SAMPLING=$([ $where = device ] && echo true || echo false)" >>"$env"
        start_server "$out/sampling-$where" "$env" >/dev/null
        # Prompts of their own for the warm-up (kernels compile) and for the measured run, so that
        # none hits the prefix cache.
        local warm=$work/prompts-tw-$where.jsonl prompts=$work/prompts-t-$where.jsonl
        python3 "$repo/scripts/gpu_bench.py" prompts "$warm" 129 "9$([ $where = device ] && echo 1 || echo 2)"
        python3 "$repo/scripts/gpu_bench.py" prompts "$prompts" 129 "9$([ $where = device ] && echo 3 || echo 4)"
        # shellcheck disable=SC2086 # $cuts is a list of flags
        timeout 60 "$bin/inferctl" --url "$url" bench --dataset "$warm" --num-prompts 128 --concurrency 128 \
            --output-len 8 --warmup 0 --temperature 1 $cuts --json >/dev/null
        # shellcheck disable=SC2086
        if timeout 70 "$bin/inferctl" --url "$url" bench --dataset "$prompts" --num-prompts 128 --concurrency 128 \
            --output-len 128 --warmup 0 --temperature 1 $cuts --json >"$out/sampling-$where/bench.json"; then
            python3 -c "
import json; d = json.load(open('$out/sampling-$where/bench.json'))
print(f'temperature 1 $cuts, concurrency 128, sampled on the $where: {d[\"completed\"]}/128 completed, {d[\"output_throughput\"]:.0f} tok/s, mean TPOT {d[\"mean_tpot_ms\"]:.2f} ms')"
        else
            echo "sampled on the $where: FAILED or timed out"
        fi
        stop_server
        grep -c "device draw failed" "$out/sampling-$where/inferfluxd.log" | sed 's/^/device draw failures logged: /'
    done
}

stepy() { # one step at a time, async scheduling, and async with overlapped steps at concurrency 128,
           # with step 8's kernels, alternated
    [ -f "$out/tuned/kernels.env" ] || tuned_kernels || return
    local mode
    for mode in off async overlap off async overlap; do
        local dir=$work/async-$mode env=$work/async-$mode.env
        {
            cat "$out/tuned/kernels.env"
            case $mode in
                off) echo "INFERFLUX__SCHEDULER__ASYNC_SCHEDULING=false" ;;
                async) echo "INFERFLUX__SCHEDULER__ASYNC_SCHEDULING=true"
                       echo "INFERFLUX__SCHEDULER__OVERLAP_STEPS=off" ;;
                overlap) echo "INFERFLUX__SCHEDULER__ASYNC_SCHEDULING=true"
                         echo "INFERFLUX__SCHEDULER__OVERLAP_STEPS=on" ;;
            esac
        } >"$env"
        start_server "$dir" "$env" >/dev/null
        bench 128 128 8 60 0 >/dev/null || echo "warm-up: FAILED or timed out"
        read -r s0 n0 i0 r0 _ <<<"$(step_metric)"
        if bench 128 128 128 70 0 >"$dir/bench.json"; then
            read -r s1 n1 i1 r1 _ <<<"$(step_metric)"
            local fed
            fed=$(curl -s "$url/metrics" | awk '/^inferflux_steps_fed_on_device_total/ {print $2}')
            python3 -c "
import json; d = json.load(open('$dir/bench.json'))
steps = max($n1 - $n0, 1); busy = $s1 - $s0
print(f'$mode: {d[\"output_throughput\"]:.0f} tok/s, mean TPOT {d[\"mean_tpot_ms\"]:.2f} ms, '
      f'executor step {busy * 1e3 / steps:.2f} ms (issue {($i1 - $i0) * 1e3 / steps:.2f}, '
      f'wait and read {($r1 - $r0) * 1e3 / steps:.2f}), busy {busy / d[\"duration_s\"]:.2f} of the run, '
      f'steps fed on the device: ${fed:-0}')"
        else
            echo "$mode: FAILED or timed out"
        fi
        stop_server
    done
}

stepk() { # GPU time per kernel in a decode step (cubecl's profiler), with step 8's kernels
    [ "$device" = cuda ] || { echo "(CUDA only)"; return; }
    [ -f "$out/tuned/kernels.env" ] || tuned_kernels || return
    local dir=$work/kernel-profile
    mkdir -p "$dir"
    for b in 1 128; do
        # cubecl times each kernel and logs it, then a summary per kind at every sync.
        printf '[compilation]\ncache = "local"\n\n[profiling.logger]\nlevel = "basic"\nfile = "%s"\n' \
            "$out/kernels-b$b.log" >"$dir/cubecl.toml"
        (
            cd "$dir" && set -a && . "$out/tuned/kernels.env" && set +a
            # The server's pool (KERNEL_PAGES=0: only the pages the batch uses), since the step
            # grew with it.
            timeout 60 "$bin/device_check" profile --device "$device" --model "$model" --batches "$b" --step-only \
                --context 192 --iters 3 --bandwidth-gbs "$bw" --pages "${KERNEL_PAGES:-4096}" >/dev/null
        ) || echo "batch $b: the profiled run failed"
        python3 "$repo/scripts/gpu_bench.py" kernel-summary "$out/kernels-b$b.log" --steps 3 | tee "$out/kernels-b$b.md"
    done
}

stepn() { # the host's issue: the bare decode step at batch 1 and 8, three ways
    # The defaults; the norms inside the GEMVs (fused_norm_gemv, off by default until this measures
    # it); every output allocated on its own (carve_outputs = false: twice the tasks for cubecl's runner).
    [ "$device" = cuda ] || { echo "(CUDA only)"; return; }
    # Alternated, two runs each, since two runs of one configuration differ by some 10%.
    for run in defaults norm-gemv apart defaults norm-gemv apart; do
        local norm=false carve=true
        case $run in norm-gemv) norm=true ;; apart) carve=false ;; esac
        echo "$run (fused_norm_gemv = $norm, carve_outputs = $carve):"
        INFERFLUX__CUDA__FUSED_NORM_GEMV=$norm INFERFLUX__CUDA__CARVE_OUTPUTS=$carve timeout 45 "$bin/device_check" \
            profile --device "$device" --model "$model" --batches 1,8 --context 192 --iters 20 --step-only 2>&1 |
            grep -E "^batch|norms in the GEMVs|refused"
    done
}

stepa() { # long contexts: the decode step at context 2048, batch 1 and 8, with the split attention off and on
    [ "$device" = cuda ] || { echo "(CUDA only)"; return; }
    # Alternated, two runs each. At batch 1 a split makes about 4 partitions of 512 keys per context
    # (32 cubes instead of 8); at batch 8, 2 partitions (128 cubes instead of 64).
    for on in false true false true; do
        echo "split_attention = $on:"
        INFERFLUX__CUDA__SPLIT_ATTENTION=$on timeout 45 "$bin/device_check" profile --device "$device" \
            --model "$model" --batches 1,8 --context 2048 --iters 10 --step-only 2>&1 |
            grep -E "^batch|paged attention|refused"
    done
}

stept() { # the skinny GEMM's plan knobs ([cuda.skinny]) against cuBLAS, at 32 and 128 rows
    [ "$device" = cuda ] || { echo "(CUDA only)"; return; }
    # min_cubes:max_shared_kib:max_steps; SKINNY_TUNINGS overrides the list.
    for t in ${SKINNY_TUNINGS:-128:100:8 256:100:8 64:100:8 128:48:4 128:160:8 128:100:2}; do
        IFS=: read -r cubes kib steps <<<"$t"
        echo "min_cubes $cubes, max_shared_kib $kib, max_steps $steps:"
        INFERFLUX__CUDA__SKINNY__MIN_CUBES=$cubes INFERFLUX__CUDA__SKINNY__MAX_SHARED_KIB=$kib \
            INFERFLUX__CUDA__SKINNY__MAX_STEPS=$steps timeout 60 "$bin/device_check" gemm --device cuda \
            --model "$model" --rows 32,128 --kernels skinny --layouts out_in --budget-s 30 2>&1 |
            grep -E "^\| (32|128) " | head -16
    done
}

# In order of value when the call's time runs short: the serving table first, then the checks.
for n in $(echo "$stages" | grep -o .); do
    title=$(grep -m1 "^step$n() {" "$repo/scripts/gpu-check.sh" | sed 's/.*# //')
    echo; echo "== $n. $title ($(( $(date +%s) - t0 )) s)"
    "step$n"
done
echo "gpu-check took $(( $(date +%s) - t0 )) s"
