#!/usr/bin/env bash
# benches/instructions.sh — user-space instructions keygate (or, for comparison, nginx's plain
# proxy) executes per proxied request, counted by valgrind's callgrind: unlike requests/s on a
# shared VM, the count repeats to within ~1% from run to run, so it shows what a change to the
# request path is worth.
#
#     KEEP=1 bash benches/load.sh            # prints "work directory kept: DIR"
#     bash benches/instructions.sh DIR        # keygate: target/release/keygate, or BIN=...
#     TARGET=nginx bash benches/instructions.sh DIR    # nginx's plain proxy, target (b)
#     SIM=1 bash benches/instructions.sh DIR  # also simulate the caches and branch predictor
#
# Knobs: DURATION=6s WARMUP=20s TARGET=keygate|nginx SIM=0|1 BIN=target/release/keygate
# DUMP=FILE (keep callgrind's output there, for callgrind_annotate).
#
# Uses DIR's bench store, keys, gateway.toml and nginx configs; runs the proxy under
# callgrind (keygate with the usage flush interval set to 1h: the periodic flush is measured
# on its own by examples/flush_profile; nginx with master_process off), warms up, zeroes the
# counters, sends DURATION of wrk load (16 connections), dumps the counters and divides by
# the requests wrk completed.
# Under valgrind SHA-256 runs its portable code (no SHA-NI): ~3 000 of the instructions
# counted per request are that, ~300 on the real CPU.
# SIM=1 adds misses per request of a simulated L1 instruction cache (I1mr), L1 data cache
# (D1mr, D1mw) and branch predictor (Bcm conditional, Bim indirect), with the host's cache
# sizes. The simulation sees one process alone (not the upstream and kernel that share the
# core in the load benchmark), so real misses are more; compare targets, not absolutes.

set -euo pipefail

DIR=${1:?usage: bash benches/instructions.sh LOAD_SH_WORK_DIR}
DURATION=${DURATION:-6s}
# The warm-up sends the keys in order and must reach every bench key, or a key's first request
# (its state and usage counter made) is counted as if it were the steady state (with a 2s
# random warm-up, 70% of the requests counted were a key's first). Under valgrind keygate
# serves 1 000-2 000 requests/s.
WARMUP=${WARMUP:-20s}
TARGET=${TARGET:-keygate}
SIM=${SIM:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/keygate}
export PATH=$PATH:/usr/sbin:/sbin

for tool in valgrind callgrind_control callgrind_annotate wrk nginx curl; do
    command -v "$tool" >/dev/null || {
        echo "instructions.sh: $tool is missing (apt-get install -y valgrind wrk nginx curl)" >&2
        exit 1
    }
done
[[ -f $DIR/gateway.toml && -f $DIR/nginx-upstream.conf && -f $DIR/nginx-proxy.conf && -f $DIR/secrets.txt ]] ||
    { echo "instructions.sh: $DIR is not a benches/load.sh work directory (run it with KEEP=1)" >&2; exit 1; }
[[ $TARGET == keygate || $TARGET == nginx ]] || { echo "instructions.sh: TARGET is keygate or nginx" >&2; exit 2; }

OUT=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -f $DIR/nginx-upstream.pid ]] && kill "$(cat "$DIR/nginx-upstream.pid")" 2>/dev/null || true
    # Wait for them to let go of their ports (a next run reuses them).
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$OUT"
}
trap cleanup EXIT

VG_OPTS=(--tool=callgrind --callgrind-out-file="$OUT/cg.%p")
[[ $SIM == 1 ]] && VG_OPTS+=(--cache-sim=yes --branch-sim=yes)
nginx -p "$DIR" -c "$DIR/nginx-upstream.conf" >/dev/null 2>&1 &
PIDS+=($!)
if [[ $TARGET == keygate ]]; then
    sed 's/^usage_flush_interval = .*/usage_flush_interval = "1h"/' "$DIR/gateway.toml" >"$OUT/gateway.toml"
    PORT=$(sed -n 's/^listen = "127.0.0.1:\([0-9]*\)"/\1/p' "$OUT/gateway.toml" | head -n 1)
    TOKIO_WORKER_THREADS=1 valgrind "${VG_OPTS[@]}" \
        "$BIN" --config "$OUT/gateway.toml" serve >"$OUT/proxy.out" 2>&1 &
else
    # One process (no master), its pid file out of the way of load.sh's.
    sed -e 's/^master_process on;/master_process off;/' -e "s|^pid .*;|pid $OUT/nginx.pid;|" \
        "$DIR/nginx-proxy.conf" >"$OUT/nginx-proxy.conf"
    PORT=$(awk '/listen/ { sub(";", "", $2); sub(".*:", "", $2); print $2; exit }' "$OUT/nginx-proxy.conf")
    valgrind "${VG_OPTS[@]}" nginx -p "$DIR" -c "$OUT/nginx-proxy.conf" >"$OUT/proxy.out" 2>&1 &
fi
VG=$!
PIDS+=("$VG")
URL=http://127.0.0.1:$PORT/
for _ in $(seq 600); do
    curl -s -o /dev/null "$URL" && break
    kill -0 "$VG" 2>/dev/null || { cat "$OUT/proxy.out" >&2; exit 1; }
    sleep 0.1
done

load() { KEYS_FILE=$DIR/secrets.txt wrk -t 1 -c 16 -d "$1" -s "$ROOT/benches/load/wrk.lua" "$URL"; }
WARMED=$(KEY_ORDER=seq load "$WARMUP" | awk '/requests in/ {print $1}')
KEYS=$(grep -c . "$DIR/secrets.txt")
((WARMED >= KEYS)) || echo "instructions.sh: warning: the warm-up reached $WARMED of $KEYS keys (raise WARMUP)" >&2
callgrind_control -z "$VG" >/dev/null 2>&1
N=$(load "$DURATION" | awk '/requests in/ {print $1}')
callgrind_control -d "$VG" >/dev/null 2>&1
CG=$(ls "$OUT"/cg.*.1)
[[ -n ${DUMP:-} ]] && cp "$CG" "$DUMP"
# PROGRAM TOTALS: one number per event, in the order of the "Events recorded" line.
read -r -a EVENTS <<<"$(callgrind_annotate "$CG" 2>/dev/null | sed -n 's/^Events recorded: *//p')"
read -r -a TOTALS <<<"$(callgrind_annotate "$CG" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(/\([^)]*\)/, ""); gsub(",", ""); NF--; NF--; print }')"
echo "$TARGET: requests: $N; user-space instructions per request: $((TOTALS[0] / N))"
if [[ $SIM == 1 ]]; then
    printf '%s: per request:' "$TARGET"
    for i in "${!EVENTS[@]}"; do
        case ${EVENTS[i]} in
        I1mr | D1mr | D1mw | Bcm | Bim) printf ' %s %s' "${EVENTS[i]}" "$(awk -v t="${TOTALS[i]}" -v n="$N" 'BEGIN { printf "%.1f", t / n }')" ;;
        esac
    done
    echo
fi
echo "top functions (instructions per request, exclusive):"
callgrind_annotate --threshold=100 "$CG" 2>/dev/null |
    awk -v n="$N" -v t="${TOTALS[0]}" '/^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
        x = $1; gsub(",", "", x); if (x == t) next
        f = $0; sub(/^.*%\) +/, "", f); sub(/ \[.*$/, "", f); sub(/^[^:]*:/, "", f)
        printf "%8d  %s\n", x / n, substr(f, 1, 100) }' |
    head -n 25
