#!/usr/bin/env bash
# benches/ab.sh — keygate builds side by side (A/B) behind the same upstream, with nginx's
# plain proxy as the yardstick, in interleaved rounds. Not part of CI.
#
#     KEEP=1 bash benches/load.sh                     # once: a work directory with configs,
#                                                     # a 10 000-key store and the keys
#     cp target/release/keygate /tmp/kg-before        # build A, then change and rebuild
#     bash benches/ab.sh /tmp/keygate-load.XXXXXX /tmp/kg-before target/release/keygate
#
# Each keygate gets its own copy of the store and its own ports; a binary may be prefixed
# with environment settings ("MIMALLOC_ALLOW_THP=1 /tmp/kg"). Cores as in load.sh: wrk on
# CPU 0, everything else on CPU 1. Prints req/s, p99 and the proxy's CPU time per request,
# split into user and kernel time, and the upstream's (which it shares the core with).
# Knobs: ROUNDS=3 DURATION=8 (seconds).
#
# A build run later in a round tends to do a little better (measured: a difference of a few
# percent flipped with the order), so list the builds balanced: A B B A.
set -euo pipefail

DIR=${1:?usage: ab.sh LOAD_DIR BINARY...}
shift
(($#)) || { echo "ab.sh: name at least one keygate binary" >&2; exit 2; }
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
WRK_LUA=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/load/wrk.lua
export PATH=$PATH:/usr/sbin:/sbin
for f in gateway.toml nginx-upstream.conf nginx-proxy.conf keygate.redb secrets.txt; do
    [[ -e $DIR/$f ]] || { echo "ab.sh: $DIR/$f missing (a directory from KEEP=1 bash benches/load.sh)" >&2; exit 2; }
done

# shellcheck source=benches/load/ports.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/ports.sh"
PIDS=()
cleanup() {
    ((${#PIDS[@]})) && kill "${PIDS[@]}" 2>/dev/null
    nginx -p "$DIR" -c "$DIR/nginx-proxy.conf" -s stop 2>/dev/null
    nginx -p "$DIR" -c "$DIR/nginx-upstream.conf" -s stop 2>/dev/null
    wait 2>/dev/null
}
trap cleanup EXIT

taskset -c 1 nginx -p "$DIR" -c "$DIR/nginx-upstream.conf" &
UPSTREAM_PID=$!
taskset -c 1 nginx -p "$DIR" -c "$DIR/nginx-proxy.conf" &
NGINX_PID=$!
NGINX_PORT=$(awk '/listen/ { sub(";", "", $2); print $2; exit }' "$DIR/nginx-proxy.conf")

PORTS=() NAMES=() KG_PIDS=()
i=0
for spec in "$@"; do
    i=$((i + 1))
    read -r port admin <<<"$(free_ports 2)"
    cp "$DIR/keygate.redb" "$DIR/ab-$i.redb"
    awk -v p="$port" -v a="$admin" -v store="$DIR/ab-$i.redb" '
        /^listen = / { n++; print "listen = \"127.0.0.1:" (n == 1 ? p : a) "\""; next }
        /^path = / { print "path = \"" store "\""; next }
        { print }' "$DIR/gateway.toml" >"$DIR/ab-$i.toml"
    # shellcheck disable=SC2086 # the spec is "ENV=... binary" on purpose
    taskset -c 1 env TOKIO_WORKER_THREADS=1 $spec --config "$DIR/ab-$i.toml" serve >"$DIR/ab-$i.out" 2>&1 &
    KG_PIDS+=($!) PORTS+=("$port") NAMES+=("$spec")
done
PIDS=("${KG_PIDS[@]}")
for url in "http://$NGINX_PORT/" "${PORTS[@]/#/http://127.0.0.1:}"; do
    for _ in $(seq 100); do curl -s -o /dev/null "$url" && break; sleep 0.1; done
done

ticks() { # "user kernel" clock ticks of the pids
    local u=0 k=0 p f
    for p in "$@"; do
        read -r -a f <<<"$(cut -d')' -f2- "/proc/$p/stat")"
        u=$((u + f[11])) k=$((k + f[12]))
    done
    echo "$u $k"
}
upstream() { # the upstream nginx's pids (master and workers)
    # shellcheck disable=SC2046
    echo "$UPSTREAM_PID" $(pgrep -P "$UPSTREAM_PID")
}
run() { # label url pids...
    local label=$1 url=$2 u0 k0 u1 k1 uu0 uk0 uu1 uk1
    shift 2
    KEYS_FILE=$DIR/secrets.txt taskset -c 0 wrk -t1 -c64 -d2s -s "$WRK_LUA" "$url" >/dev/null
    read -r u0 k0 <<<"$(ticks "$@")"
    # shellcheck disable=SC2046
    read -r uu0 uk0 <<<"$(ticks $(upstream))"
    KEYS_FILE=$DIR/secrets.txt taskset -c 0 wrk -t1 -c64 -d"${DURATION}s" -s "$WRK_LUA" "$url" >"$DIR/ab-wrk.txt"
    read -r u1 k1 <<<"$(ticks "$@")"
    # shellcheck disable=SC2046
    read -r uu1 uk1 <<<"$(ticks $(upstream))"
    awk -v l="$label" -v u=$((u1 - u0)) -v k=$((k1 - k0)) -v uu=$((uu1 - uu0)) -v uk=$((uk1 - uk0)) \
        -v hz="$(getconf CLK_TCK)" '$1 == "RESULT" {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        per = 1e6 / hz / v["requests"]
        printf "%-40s %8.0f req/s  p99 %5.2f ms  CPU %5.2f us/req (user %4.2f, kernel %4.2f)  upstream user %4.2f, kernel %4.2f\n",
            l, v["rps"], v["p99_us"] / 1000, (u + k) * per, u * per, k * per, uu * per, uk * per }' "$DIR/ab-wrk.txt"
}
for r in $(seq "$ROUNDS"); do
    echo "round $r"
    # shellcheck disable=SC2046 # nginx master + workers
    run "nginx proxy" "http://$NGINX_PORT/" "$NGINX_PID" $(pgrep -P "$NGINX_PID")
    for j in "${!PORTS[@]}"; do
        run "${NAMES[$j]}" "http://127.0.0.1:${PORTS[$j]}/" "${KG_PIDS[$j]}"
    done
done
