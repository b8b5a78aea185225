#!/usr/bin/env bash
# benches/instructions.sh — user-space instructions keygate executes per proxied request,
# counted by valgrind's callgrind: unlike requests/s on a shared VM, the count repeats to
# within ~1% from run to run, so it shows what a change to the request path is worth.
#
#     KEEP=1 bash benches/load.sh            # prints "work directory kept: DIR"
#     bash benches/instructions.sh DIR        # [DURATION=6s] [BIN=target/release/keygate]
#
# Uses DIR's bench store, keys, gateway.toml and upstream nginx config; runs keygate under
# callgrind with the usage flush interval set to 1h (the periodic flush is measured on its
# own by examples/flush_profile), warms up, zeroes the counters, sends DURATION of wrk load
# (16 connections), dumps the counters and divides by the requests wrk completed.
# Under valgrind SHA-256 runs its portable code (no SHA-NI): ~3 000 of the instructions
# counted per request are that, ~300 on the real CPU.

set -euo pipefail

DIR=${1:?usage: bash benches/instructions.sh LOAD_SH_WORK_DIR}
DURATION=${DURATION:-6s}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/keygate}

for tool in valgrind callgrind_control callgrind_annotate wrk nginx curl; do
    command -v "$tool" >/dev/null || {
        echo "instructions.sh: $tool is missing (apt-get install -y valgrind wrk nginx curl)" >&2
        exit 1
    }
done
[[ -f $DIR/gateway.toml && -f $DIR/nginx-upstream.conf && -f $DIR/secrets.txt ]] ||
    { echo "instructions.sh: $DIR is not a benches/load.sh work directory (run it with KEEP=1)" >&2; exit 1; }

OUT=$(mktemp -d)
sed 's/^usage_flush_interval = .*/usage_flush_interval = "1h"/' "$DIR/gateway.toml" >"$OUT/gateway.toml"
PORT=$(sed -n 's/^listen = "127.0.0.1:\([0-9]*\)"/\1/p' "$OUT/gateway.toml" | head -n 1)
URL=http://127.0.0.1:$PORT/

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -f $DIR/nginx-upstream.pid ]] && kill "$(cat "$DIR/nginx-upstream.pid")" 2>/dev/null || true
    # Wait for them to let go of their ports (a next run reuses them).
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$OUT"
}
trap cleanup EXIT

nginx -p "$DIR" -c "$DIR/nginx-upstream.conf" >/dev/null 2>&1 &
PIDS+=($!)
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.%p" \
    "$BIN" --config "$OUT/gateway.toml" serve >"$OUT/keygate.out" 2>&1 &
VG=$!
PIDS+=("$VG")
for _ in $(seq 600); do
    curl -s -o /dev/null "$URL" && break
    kill -0 "$VG" 2>/dev/null || { cat "$OUT/keygate.out" >&2; exit 1; }
    sleep 0.1
done

load() { KEYS_FILE=$DIR/secrets.txt wrk -t 1 -c 16 -d "$1" -s "$ROOT/benches/load/wrk.lua" "$URL"; }
load 2s >/dev/null
callgrind_control -z "$VG" >/dev/null 2>&1
N=$(load "$DURATION" | awk '/requests in/ {print $1}')
callgrind_control -d "$VG" >/dev/null 2>&1
DUMP=$(ls "$OUT"/cg.*.1)
TOTAL=$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "requests: $N; user-space instructions per request: $((TOTAL / N))"
echo "top functions (instructions per request, exclusive):"
callgrind_annotate --threshold=100 "$DUMP" 2>/dev/null |
    awk -v n="$N" -v t="$TOTAL" '/^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
        x = $1; gsub(",", "", x); if (x == t) next
        f = $0; sub(/^.*%\) +/, "", f); sub(/ \[.*$/, "", f); sub(/^[^:]*:/, "", f)
        printf "%8d  %s\n", x / n, substr(f, 1, 100) }' |
    head -n 25
