#!/usr/bin/env bash
# The instructions the host runs to issue one decode step through cubecl, counted by callgrind on
# the calling thread (`device_check issue`, on wgpu's Vulkan backend: lavapipe where there is no
# GPU). The calling thread's work (the model's code, burn's ops, cubecl's launch builder) is the
# same on CUDA, and callgrind's counts repeat on a shared, noisy machine where times do not.
#
#   scripts/issue-instructions.sh [DEVICE_CHECK_BINARY]
#
# It runs the bench twice, with SHORT and LONG measured steps (default 20 and 60), and prints the
# difference per step, by whose code ran it (self cost), so that warm-up and set-up cancel out,
# and the tasks per step it queued for cubecl's runner (launches, allocations, uploads).
# "waiting for cubecl's runner" is the caller spinning on cubecl's full task queue (its runner is
# slower than the caller on lavapipe, and under valgrind threads take turns): not issue work.
# Needs valgrind and lavapipe (Debian: valgrind, mesa-vulkan-drivers). INFERFLUX__CUDA__* settings
# pass through, e.g. INFERFLUX__CUDA__FUSED_NORM_GEMV=true.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
if [ -z "$bin" ]; then
    bin=$(cargo bench --bench device_check --no-run 2>&1 | grep -o 'target/release/deps/device_check-[0-9a-f]*' | head -1)
fi
short=${SHORT:-20}
long=${LONG:-60}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Self cost by owner: the caller's thread is the file callgrind writes first (`-01`).
by_owner() {
    callgrind_annotate --threshold=100 "$1" 2>/dev/null | awk '
        $1 ~ /^[0-9,]+$/ && $0 ~ /\?\?\?:|\.c:|\.S:/ {
            n = $1; gsub(",", "", n)
            k = "other (std, smallvec, hashbrown, fmt, ...)"
            if ($0 ~ /ChannelDeviceHandle.*submit_inner/) k = "waiting for cubecl'"'"'s runner"
            else if ($0 ~ /\?\?\?:(<|core::ptr::drop_in_place<)?inferflux/) k = "inferflux (the model, its hooks and kernels'"'"' launchers)"
            else if ($0 ~ /burn/) k = "burn (tensor ops, CubeTensor)"
            else if ($0 ~ /cubecl/) k = "cubecl (launch builder, client, allocator)"
            else if ($0 ~ /malloc|free|__rust_alloc|__rdl|__rust_dealloc|realloc/) k = "heap (malloc, free)"
            else if ($0 ~ /memcpy|memmove|memset/) k = "memcpy, memset"
            cost[k] += n
        }
        END { for (k in cost) printf "%s\t%d\n", k, cost[k] }'
}

# The tasks the caller queued for cubecl's runner, by kind: calls into the queue from cubecl's
# client (a launch, an output's allocation, an upload).
tasks() {
    callgrind_annotate --tree=caller --threshold=100 "$1" 2>/dev/null |
        grep -B6 '\*  .*ChannelDeviceHandle<S>::submit_inner' |
        sed -nE 's/.*ComputeClient<R>::(launch_inner|do_empty|do_create) \(([0-9,]+)x\).*/\1\t\2/p' |
        tr -d ',' | awk -F'\t' '
            { name = $1 == "launch_inner" ? "launches" : $1 == "do_empty" ? "allocations" : "uploads"; n[name] += $2 }
            END { for (k in n) printf "%s\t%d\n", k, n[k] }'
}

for steps in "$short" "$long"; do
    valgrind --tool=callgrind --separate-threads=yes --collect-atstart=no \
        '--toggle-collect=*issue_decode_step*' --callgrind-out-file="$out/cg-$steps" \
        "$bin" issue --steps "$steps" > "$out/log-$steps" 2>&1
    by_owner "$out/cg-$steps-01" | sort > "$out/owner-$steps"
    tasks "$out/cg-$steps-01" | sort > "$out/tasks-$steps"
done

echo "| instructions per decode step on the caller's thread | count |"
echo "|---|---:|"
join -t $'\t' "$out/owner-$short" "$out/owner-$long" | awk -F'\t' -v d=$((long - short)) '
    { per = ($3 - $2) / d; rows[$1] = per; if ($1 !~ /waiting/) total += per }
    END {
        for (k in rows) printf "| %s | %.0f |\n", k, rows[k] | "sort -t\"|\" -k3 -rn"
        close("sort -t\"|\" -k3 -rn")
        printf "| **issue work in all (without the waiting)** | **%.0f** |\n", total
    }'
echo
echo "| tasks queued for cubecl's runner per decode step | count |"
echo "|---|---:|"
join -t $'\t' "$out/tasks-$short" "$out/tasks-$long" |
    awk -F'\t' -v d=$((long - short)) '{ printf "| %s | %.1f |\n", $1, ($3 - $2) / d }'
grep -m1 '^issue:' "$out/log-$long" || true
