#!/usr/bin/env bash
# benches/load.sh — load comparison of keygate against nginx and HAProxy on one machine.
#
# Not part of CI. Run from anywhere as root (it installs nginx, haproxy, wrk and curl with
# apt-get when missing):
#
#     bash benches/load.sh
#
# Targets, all on 127.0.0.1 with ports picked free at run time, all without access logs:
#   (a) the upstream itself: nginx answering `200 "ok\n"` over keep-alive
#   (b) nginx as a plain keep-alive reverse proxy to (a)              (no auth)
#   (c) HAProxy with a map of the bench API keys (401 unless found) and a per-key
#       stick-table rate limit that never triggers, in front of (a)
#   (d) keygate `serve` with a store of the same bench keys, a per-key rate limit that
#       never triggers and usage counting on (flushed every 1s), in front of (a)
#
# wrk sends GET / with an X-API-Key picked at random among the bench keys (for every
# target; (a) and (b) ignore it). Targets are measured in interleaved rounds
# (a b c d, a b c d, ...) and the medians are reported, with the CPU time the proxy
# process(es) used per request (utime+stime from /proc/PID/stat).
#
# Knobs (environment variables):
#   DURATION=10s  CONNECTIONS=64  THREADS=1  ROUNDS=3  WARMUP=2s  KEYS=10000
#   LOADGEN_CPU=0 SERVER_CPU=1   cores for wrk / for the proxy under test and the upstream
#   TARGETS="a b c d"             which targets to measure
#   PROFILE=0                     1: after the rounds, `perf record` keygate during one
#                                 extra (unreported) load run and print its top symbols
#   MAX_OTHER=15 RETRIES=1 RETRY_BUDGET=120
#                                 a run during which other processes used more than
#                                 MAX_OTHER % of a core is repeated (once the machine is
#                                 quiet), up to RETRIES times, RETRY_BUDGET seconds in all
#   SKIP_BUILD=0                  1: use the existing target/release binaries
#                                 (with CARGO_TARGET_DIR: the binaries of another checkout)
#   PGO=0                         1: measure the profile-guided build, target/pgo/keygate
#                                 (made first by benches/pgo.sh, ~10 min; with SKIP_BUILD=1
#                                 the existing one)
#   KEEP=0                        1: keep the work directory (configs, logs) at the end
#
# Exit status: 0 when every measured run had zero errors and zero non-2xx answers.

set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2s}
KEYS=${KEYS:-10000}
LOADGEN_CPU=${LOADGEN_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
TARGETS=${TARGETS:-a b c d}
PROFILE=${PROFILE:-0}
MAX_OTHER=${MAX_OTHER:-15}
RETRIES=${RETRIES:-1}
RETRY_BUDGET=${RETRY_BUDGET:-120}
SKIP_BUILD=${SKIP_BUILD:-0}
PGO=${PGO:-0}
KEEP=${KEEP:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPL=$ROOT/benches/load
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
KEYGATE=$TARGET_DIR/release/keygate
GEN_STORE=$TARGET_DIR/release/examples/gen_store

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'load.sh: warning: %s\n' "$*" >&2; }
die() {
    printf 'load.sh: error: %s\n' "$*" >&2
    exit 1
}

for v in CONNECTIONS THREADS ROUNDS KEYS LOADGEN_CPU SERVER_CPU MAX_OTHER RETRIES RETRY_BUDGET; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((ROUNDS >= 1)) || die "ROUNDS must be at least 1"
[[ $PGO == 0 || $PGO == 1 ]] || die "PGO is 0 or 1 (got '$PGO')"
secs_of() { # wrk duration (10, 10s, 2m, 1h) -> seconds
    case $1 in
    *s) echo "${1%s}" ;;
    *m) echo $((${1%m} * 60)) ;;
    *h) echo $((${1%h} * 3600)) ;;
    *) echo "$1" ;;
    esac
}
for v in DURATION WARMUP; do
    [[ ${!v} =~ ^[1-9][0-9]*[smh]?$ ]] || die "$v must be a wrk duration such as 10s or 2m (got '${!v}')"
done
DURATION_SECS=$(secs_of "$DURATION")
((KEYS >= 1)) || die "KEYS must be at least 1"
for t in $TARGETS; do
    [[ $t =~ ^[abcd]$ ]] || die "TARGETS lists a, b, c or d (got '$t')"
done

# ---------------------------------------------------------------------------------------
# 1. Tools and binaries
# ---------------------------------------------------------------------------------------
# shellcheck source=benches/load/tools.sh
source "$TPL/tools.sh"
need_tools nginx:nginx haproxy:haproxy wrk:wrk curl:curl taskset:util-linux
NPROC=$(nproc)
if ((LOADGEN_CPU >= NPROC || SERVER_CPU >= NPROC)); then
    warn "this machine has $NPROC core(s); using CPU 0 for everything"
    LOADGEN_CPU=0 SERVER_CPU=0
fi
[[ $LOADGEN_CPU != "$SERVER_CPU" ]] || warn "wrk and the servers share CPU $SERVER_CPU: numbers will be noisy"

if [[ $SKIP_BUILD != 1 ]]; then
    log "building keygate and the gen_store example (cargo build --release)"
    (cd "$ROOT" && cargo build --release && cargo build --release --example gen_store) ||
        die "cargo build failed (see above)"
    if [[ $PGO == 1 ]]; then
        log "building the profile-guided keygate (benches/pgo.sh)"
        bash "$ROOT/benches/pgo.sh" || die "benches/pgo.sh failed (see above)"
    fi
fi
[[ $PGO == 1 ]] && KEYGATE=$TARGET_DIR/pgo/keygate
[[ -x $KEYGATE ]] || die "$KEYGATE not found (build it, or unset SKIP_BUILD)"
KEYGATE_DESC=$("$KEYGATE" --version 2>/dev/null || echo keygate)
[[ $PGO == 1 ]] && KEYGATE_DESC="$KEYGATE_DESC (profile-guided build)"
if [[ $SKIP_BUILD != 1 ]] && command -v git >/dev/null 2>&1; then
    KEYGATE_DESC="$KEYGATE_DESC, built from $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "an unknown commit")"
else
    KEYGATE_DESC="$KEYGATE_DESC, $KEYGATE"
fi
[[ -x $GEN_STORE ]] || die "$GEN_STORE not found (cargo build --release --example gen_store)"

# ---------------------------------------------------------------------------------------
# 2. Work directory, processes, cleanup
# ---------------------------------------------------------------------------------------
DIR=$(mktemp -d "${TMPDIR:-/tmp}/keygate-load.XXXXXX")
chmod 755 "$DIR" # nginx workers may run as another user
PIDS=()
declare -A PNAME=()

stop_pid() { # pid: TERM, wait up to 5s, then KILL (with its direct children)
    local pid=$1 i kids
    kill -0 "$pid" 2>/dev/null || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    kids=$(pgrep -P "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        warn "${PNAME[$pid]:-pid $pid} did not stop on TERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    if [[ $KEEP == 1 ]]; then
        log "work directory kept: $DIR"
    else
        rm -rf "$DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() { # name cmd...: start in the background, record the pid
    local name=$1
    shift
    "$@" >"$DIR/$name.out" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    PNAME[$pid]=$name
    LAST_PID=$pid
}

# shellcheck source=benches/load/ports.sh
source "$TPL/ports.sh"

read -r UPSTREAM_PORT NGINX_PORT HAPROXY_PORT KEYGATE_PORT ADMIN_PORT <<<"$(free_ports 5)"
[[ -n $ADMIN_PORT ]] || die "could not pick free ports"
if [[ $(id -u) == 0 ]]; then USER_LINE="user root;"; else USER_LINE=""; fi

log "work directory $DIR"
log "ports: upstream $UPSTREAM_PORT, nginx proxy $NGINX_PORT, haproxy $HAPROXY_PORT, keygate $KEYGATE_PORT (admin $ADMIN_PORT)"

# Keys: one store, one secrets file, one HAProxy map with the same secrets.
SECRETS=$DIR/secrets.txt
log "generating a store with $KEYS keys"
"$GEN_STORE" "$DIR/keygate.redb" "$KEYS" "$SECRETS" 2>"$DIR/gen_store.out" || {
    cat "$DIR/gen_store.out" >&2
    die "gen_store failed"
}
[[ $(wc -l <"$SECRETS") -eq $KEYS ]] || die "gen_store wrote $(wc -l <"$SECRETS") secrets, expected $KEYS"
awk '{ print $0, 1 }' "$SECRETS" >"$DIR/keys.map"
maxlen=$(awk '{ if (length($0) > m) m = length($0) } END { print m }' "$SECRETS")
((maxlen <= 64)) || warn "secrets are $maxlen chars, longer than the stick table's len 64"
KEY1=$(head -n 1 "$SECRETS")

for t in nginx-upstream nginx-proxy; do mkdir -p "$DIR/$t-tmp"; done
render "$TPL/nginx-upstream.conf.in" "$DIR/nginx-upstream.conf"
render "$TPL/nginx-proxy.conf.in" "$DIR/nginx-proxy.conf"
render "$TPL/haproxy.cfg.in" "$DIR/haproxy.cfg"
render "$TPL/gateway.toml.in" "$DIR/gateway.toml"

for conf in nginx-upstream nginx-proxy; do
    nginx -t -q -p "$DIR" -c "$DIR/$conf.conf" 2>"$DIR/nginx-t.out" || {
        cat "$DIR/nginx-t.out" >&2
        die "nginx rejected $DIR/$conf.conf"
    }
done
haproxy -c -q -f "$DIR/haproxy.cfg" >"$DIR/haproxy-c.out" 2>&1 || {
    cat "$DIR/haproxy-c.out" >&2
    die "haproxy rejected $DIR/haproxy.cfg"
}
"$KEYGATE" --config "$DIR/gateway.toml" check >"$DIR/keygate-check.out" 2>&1 || {
    cat "$DIR/keygate-check.out" >&2
    die "keygate check rejected $DIR/gateway.toml"
}

# ---------------------------------------------------------------------------------------
# 3. Start everything, pinned: wrk on LOADGEN_CPU; upstream and proxies on SERVER_CPU
# ---------------------------------------------------------------------------------------
PIN=(taskset -c "$SERVER_CPU")
start nginx-upstream "${PIN[@]}" nginx -p "$DIR" -c "$DIR/nginx-upstream.conf"
UP_PID=$LAST_PID
wait_http nginx-upstream "$UP_PID" "http://127.0.0.1:$UPSTREAM_PORT/"
start nginx-proxy "${PIN[@]}" nginx -p "$DIR" -c "$DIR/nginx-proxy.conf"
NGINX_PID=$LAST_PID
wait_http nginx-proxy "$NGINX_PID" "http://127.0.0.1:$NGINX_PORT/"
start haproxy "${PIN[@]}" haproxy -db -f "$DIR/haproxy.cfg"
HAPROXY_PID=$LAST_PID
wait_http haproxy "$HAPROXY_PID" "http://127.0.0.1:$HAPROXY_PORT/"
start keygate env TOKIO_WORKER_THREADS=1 "${PIN[@]}" "$KEYGATE" --config "$DIR/gateway.toml" serve
KEYGATE_PID=$LAST_PID
wait_http keygate "$KEYGATE_PID" "http://127.0.0.1:$ADMIN_PORT/healthz"

# Sanity checks before measuring.
expect() { # description expected-status expected-body-or-empty curl-args...
    local what=$1 want=$2 body=$3
    shift 3
    local got
    got=$(curl -s -o "$DIR/expect.body" -w '%{http_code}' --max-time 5 "$@" || true)
    [[ $got == "$want" ]] || {
        cat "$DIR/expect.body" >&2 2>/dev/null || true
        die "$what: expected HTTP $want, got $got"
    }
    if [[ -n $body && $(cat "$DIR/expect.body") != "$body" ]]; then
        die "$what: expected body '$body', got '$(head -c 200 "$DIR/expect.body")'"
    fi
    printf '    ok  %-44s %s\n' "$what" "$got" >&2
}
log "checking the targets answer as expected"
expect "(a) upstream" 200 ok "http://127.0.0.1:$UPSTREAM_PORT/"
expect "(b) nginx proxy" 200 ok "http://127.0.0.1:$NGINX_PORT/"
expect "(c) haproxy, valid key" 200 ok -H "X-API-Key: $KEY1" "http://127.0.0.1:$HAPROXY_PORT/"
expect "(c) haproxy, no key" 401 "" "http://127.0.0.1:$HAPROXY_PORT/"
# KEY1 with its last character changed (to x, or to y when it already ends in x).
if [[ $KEY1 == *x ]]; then BAD_KEY=${KEY1%?}y; else BAD_KEY=${KEY1%?}x; fi
expect "(c) haproxy, unknown key" 401 "" -H "X-API-Key: $BAD_KEY" "http://127.0.0.1:$HAPROXY_PORT/"
expect "(d) keygate, valid key" 200 ok -H "X-API-Key: $KEY1" "http://127.0.0.1:$KEYGATE_PORT/"
expect "(d) keygate, no key" 401 "" "http://127.0.0.1:$KEYGATE_PORT/"
expect "(d) keygate, unknown key" 401 "" -H "X-API-Key: $BAD_KEY" "http://127.0.0.1:$KEYGATE_PORT/"
loaded=$(curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '$1 == "keygate_keys_loaded" { print $2 }')
[[ $loaded == "$KEYS" ]] || die "keygate reports keygate_keys_loaded=${loaded:-?}, expected $KEYS"
printf '    ok  %-44s %s\n' "(d) keygate keys loaded" "$loaded" >&2

# ---------------------------------------------------------------------------------------
# 4. Measure
# ---------------------------------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)

proc_ticks() { # pids...: utime+stime summed, in clock ticks
    local total=0 pid stat rest f
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        rest=${stat##*) }
        read -r -a f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

cpu_counters() { # cpu: "busy total" ticks of that core from /proc/stat
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

task_ticks_all() { # user+nice+system ticks of the whole machine (what processes are charged)
    awk '$1 == "cpu" { print $2 + $3 + $4 }' /proc/stat
}

reaped_child_ticks() { # cutime+cstime of this script: includes wrk once it has been waited for
    local stat rest f
    stat=$(cat "/proc/$$/stat")
    rest=${stat##*) }
    read -r -a f <<<"$rest"
    echo $((f[13] + f[14]))
}

# shellcheck disable=SC2046 # pgrep prints one pid per line: split on purpose
pids_of() { # target: the pids whose CPU time is the target's (nginx: master + workers)
    case $1 in
    a) echo "$UP_PID" $(pgrep -P "$UP_PID" || true) ;;
    b) echo "$NGINX_PID" $(pgrep -P "$NGINX_PID" || true) ;;
    c) echo "$HAPROXY_PID" ;;
    d) echo "$KEYGATE_PID" ;;
    esac
}

url_of() {
    case $1 in
    a) echo "http://127.0.0.1:$UPSTREAM_PORT/" ;;
    b) echo "http://127.0.0.1:$NGINX_PORT/" ;;
    c) echo "http://127.0.0.1:$HAPROXY_PORT/" ;;
    d) echo "http://127.0.0.1:$KEYGATE_PORT/" ;;
    esac
}

label_of() {
    case $1 in
    a) echo "(a) upstream nginx, direct" ;;
    b) echo "(b) nginx proxy, no auth" ;;
    c) echo "(c) haproxy + key map + rate" ;;
    d) echo "(d) keygate" ;;
    esac
}

check_alive() {
    local pid
    for pid in "$UP_PID" "$NGINX_PID" "$HAPROXY_PID" "$KEYGATE_PID"; do
        kill -0 "$pid" 2>/dev/null || {
            show_log "${PNAME[$pid]}"
            die "${PNAME[$pid]} (pid $pid) has exited"
        }
    done
}

run_wrk() { # target duration outfile
    KEYS_FILE=$SECRETS taskset -c "$LOADGEN_CPU" wrk -t "$THREADS" -c "$CONNECTIONS" -d "$2" \
        --latency -s "$TPL/wrk.lua" "$(url_of "$1")" >"$3" 2>&1 || {
        cat "$3" >&2
        die "wrk failed against $(label_of "$1")"
    }
    grep -q '^RESULT ' "$3" || {
        cat "$3" >&2
        die "wrk printed no RESULT line against $(label_of "$1")"
    }
}

field() { # file name: value of name=... on the RESULT line
    awk -v k="$2" '$1 == "RESULT" { for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) print kv[2] } }' "$1"
}

RESULTS=$DIR/results.tsv
: >"$RESULTS"
# shellcheck disable=SC2086 # pid lists are split on purpose
measure_once() { # target round: one run, its result line in $DIR/last.tsv
    local t=$1 r=$2 out=$DIR/wrk-$1-$2.txt
    local proxy_pids up_pids p0 p1 u0 u1 l0 s0 l1 s1 w0 w1 m0 m1
    proxy_pids=$(pids_of "$t")
    up_pids=$(pids_of a)
    p0=$(proc_ticks $proxy_pids)
    u0=$(proc_ticks $up_pids)
    w0=$(reaped_child_ticks)
    m0=$(task_ticks_all)
    l0=$(cpu_counters "$LOADGEN_CPU")
    s0=$(cpu_counters "$SERVER_CPU")
    run_wrk "$t" "$DURATION" "$out"
    p1=$(proc_ticks $proxy_pids)
    u1=$(proc_ticks $up_pids)
    w1=$(reaped_child_ticks)
    m1=$(task_ticks_all)
    l1=$(cpu_counters "$LOADGEN_CPU")
    s1=$(cpu_counters "$SERVER_CPU")
    check_alive
    local req rps p50 p99 non2xx errs
    req=$(field "$out" requests)
    rps=$(field "$out" rps)
    p50=$(field "$out" p50_us)
    p99=$(field "$out" p99_us)
    non2xx=$(field "$out" non2xx)
    errs=$(($(field "$out" connect_err) + $(field "$out" read_err) + $(field "$out" write_err) + $(field "$out" timeout_err)))
    ((req > 0)) || die "no requests completed against $(label_of "$t") (see $out)"
    local up_delta=$((u1 - u0))
    [[ $t != a ]] || up_delta=0 # for (a) the upstream is the target, counted once
    awk -v t="$t" -v r="$r" -v req="$req" -v rps="$rps" -v p50="$p50" -v p99="$p99" \
        -v dp=$((p1 - p0)) -v du=$((u1 - u0)) -v hz="$CLK_TCK" -v n2="$non2xx" -v e="$errs" \
        -v l0="$l0" -v l1="$l1" -v s0="$s0" -v s1="$s1" \
        -v other=$(((m1 - m0) - (w1 - w0) - (p1 - p0) - up_delta)) 'BEGIN {
        split(l0, a, " "); split(l1, b, " "); split(s0, c, " "); split(s1, d, " ");
        lbusy = (b[2] > a[2]) ? 100 * (b[1] - a[1]) / (b[2] - a[2]) : 0;
        sbusy = (d[2] > c[2]) ? 100 * (d[1] - c[1]) / (d[2] - c[2]) : 0;
        cpu = dp * 1e6 / hz / req;
        upcpu = (t == "a") ? -1 : du * 1e6 / hz / req;
        # CPU charged to processes other than wrk, the proxy and the upstream, in % of one core
        oth = (d[2] > c[2]) ? 100 * other / (d[2] - c[2]) : 0;
        if (oth < 0) oth = 0;
        printf "%s\t%s\t%.1f\t%d\t%d\t%.2f\t%.2f\t%d\t%d\t%.0f\t%.0f\t%.0f\n", t, r, rps, p50, p99, cpu, upcpu, n2, e, lbusy, sbusy, oth
    }' >"$DIR/last.tsv"
    awk -F'\t' -v label="$(label_of "$t")" '{
        printf "    round %s  %-30s %9.0f req/s  p50 %6.2f ms  p99 %6.2f ms  CPU %6.2f us/req  non-2xx %d  errors %d  (busy: wrk core %d%%, server core %d%%; other processes %d%% of a core)\n",
            $2, label, $3, $4 / 1000, $5 / 1000, $6, $8, $9, $10, $11, $12 }' "$DIR/last.tsv" >&2
}

# A run during which other processes used more than MAX_OTHER % of a core is repeated, once
# the machine is quiet again, up to RETRIES times, within RETRY_BUDGET seconds in all.
RETRY_SPENT=0
NOISY_RUNS=0
measure() { # target round
    local t=$1 r=$2 attempt oth started i
    for ((attempt = 0; ; attempt++)); do
        measure_once "$t" "$r"
        oth=$(cut -f 12 "$DIR/last.tsv")
        ((oth > MAX_OTHER)) || break
        if ((attempt >= RETRIES || RETRY_SPENT >= RETRY_BUDGET)); then
            NOISY_RUNS=$((NOISY_RUNS + 1))
            warn "keeping a noisy run (other processes used ${oth}% of a core; no retries left)"
            break
        fi
        started=$SECONDS
        log "other processes used ${oth}% of a core during that run: waiting for a quiet machine, then repeating it"
        for ((i = 0; i < 20; i++)); do
            (($(idle_check) <= 10)) && break
        done
        RETRY_SPENT=$((RETRY_SPENT + SECONDS - started))
    done
    cat "$DIR/last.tsv" >>"$RESULTS"
    RETRY_SPENT=$((RETRY_SPENT + attempt * DURATION_SECS))
}

cat >&2 <<EOF
==> core sharing on this $NPROC-core machine:
      wrk ($THREADS thread(s), $CONNECTIONS connections)     -> CPU $LOADGEN_CPU
      proxy under test + the upstream nginx   -> CPU $SERVER_CPU (shared)
      upstream nginx: worker_processes 1; nginx proxy: worker_processes 1;
      HAProxy: nbthread 1; keygate: [server] workers = 1 and TOKIO_WORKER_THREADS=1 for
      its admin/background runtime (its usage-flush thread is pinned to CPU $SERVER_CPU too)
    logging: no access logs anywhere (nginx access_log off, HAProxy without log,
      keygate [log] level = "warn", which drops its per-request access line)
EOF

# Other work on the machine skews everything: say so when it is not idle.
idle_check() {
    local a b
    a=$(awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
    sleep 1
    b=$(awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        print (y[2] > x[2]) ? int(100 * (y[1] - x[1]) / (y[2] - x[2]) + 0.5) : 0 }'
}
BUSY_BEFORE=$(idle_check)
if ((BUSY_BEFORE > 10)); then
    warn "the machine is ${BUSY_BEFORE}% busy with other processes; waiting up to 20 s for it to calm down"
    ps -eo pcpu=,pid=,comm= --sort=-pcpu | head -n 5 | sed 's/^/      /' >&2
    for ((i = 0; i < 19 && BUSY_BEFORE > 10; i++)); do BUSY_BEFORE=$(idle_check); done
    ((BUSY_BEFORE <= 10)) || warn "still ${BUSY_BEFORE}% busy: going ahead; noisy runs are repeated (MAX_OTHER, RETRIES)"
fi

log "warm-up: $WARMUP per target (not measured)"
for t in $TARGETS; do run_wrk "$t" "$WARMUP" "$DIR/wrk-$t-warmup.txt"; done

log "measuring: $ROUNDS round(s) of [$TARGETS], $DURATION each, wrk -t $THREADS -c $CONNECTIONS"
for ((r = 1; r <= ROUNDS; r++)); do
    for t in $TARGETS; do measure "$t" "$r"; done
done

# keygate's own counters, to show it authenticated and counted everything.
metrics=$(curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" || true)
kg_ok=$(awk '$1 ~ /^keygate_requests_total\{.*status="2xx"/ { s += $2 } END { print s + 0 }' <<<"$metrics")
kg_flush=$(awk '$1 == "keygate_usage_flush_seconds" { print $2 }' <<<"$metrics")

# ---------------------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------------------
median() { # column target
    awk -F'\t' -v col="$1" -v t="$2" '$1 == t { print $col }' "$RESULTS" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
sum_col() { awk -F'\t' -v col="$1" '{ s += $col } END { print s + 0 }' "$RESULTS"; }

declare -A RPS=() CPU=()
echo
echo "keygate load comparison — $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), $NPROC cores"
echo "wrk -t $THREADS -c $CONNECTIONS -d $DURATION, GET / with a random X-API-Key of $KEYS; $ROUNDS interleaved round(s), medians"
echo "keygate: $KEYGATE_DESC"
echo "cores: wrk on CPU $LOADGEN_CPU; proxy under test + upstream nginx share CPU $SERVER_CPU (1 worker/thread each)"
echo "no access logs: nginx access_log off, HAProxy no log, keygate log level \"warn\""
echo "machine busy before the runs: ${BUSY_BEFORE}% (our servers idle; above ~10% the numbers are skewed)"
echo
printf '%-30s %10s %9s %9s %13s %13s %8s %8s\n' "target" "req/s" "p50 ms" "p99 ms" "CPU us/req" "upstr us/req" "non-2xx" "errors"
printf '%-30s %10s %9s %9s %13s %13s %8s %8s\n' "------" "-----" "------" "------" "----------" "------------" "-------" "------"
for t in $TARGETS; do
    RPS[$t]=$(median 3 "$t")
    CPU[$t]=$(median 6 "$t")
    up=$(median 7 "$t")
    n2=$(awk -F'\t' -v t="$t" '$1 == t { s += $8 } END { print s + 0 }' "$RESULTS")
    er=$(awk -F'\t' -v t="$t" '$1 == t { s += $9 } END { print s + 0 }' "$RESULTS")
    awk -v label="$(label_of "$t")" -v rps="${RPS[$t]}" -v p50="$(median 4 "$t")" -v p99="$(median 5 "$t")" \
        -v cpu="${CPU[$t]}" -v up="$up" -v n2="$n2" -v er="$er" 'BEGIN {
        ups = (up < 0) ? "(is upstream)" : sprintf("%.2f", up);
        printf "%-30s %10.0f %9.2f %9.2f %13.2f %13s %8d %8d\n", label, rps, p50 / 1000, p99 / 1000, cpu, ups, n2, er }'
done
echo
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
if [[ -n ${RPS[d]:-} ]]; then
    for base in b c; do
        [[ -n ${RPS[$base]:-} ]] || continue
        name=$([[ $base == b ]] && echo "nginx  " || echo "HAProxy")
        printf 'keygate / %s   throughput %sx   CPU per request %sx\n' "$name" \
            "$(ratio "${RPS[d]}" "${RPS[$base]}")" "$(ratio "${CPU[d]}" "${CPU[$base]}")"
    done
    echo "keygate counted ${kg_ok:-?} 2xx requests in its metrics (warm-ups and checks included); last usage flush took ${kg_flush:-?} s"
fi
echo "busy % (median) wrk core / server core: $(for t in $TARGETS; do printf '%s %s/%s  ' "$t" "$(median 10 "$t")" "$(median 11 "$t")"; done)"
other_max=$(awk -F'\t' '$12 > m { m = $12 } END { print m + 0 }' "$RESULTS")
echo "CPU used by other processes during the runs: at most ${other_max}% of a core"
if ((other_max > MAX_OTHER)); then
    echo "WARNING: $NOISY_RUNS run(s) kept although other processes used up to ${other_max}% of a core: those numbers are skewed; rerun on a quiet machine"
fi

# ---------------------------------------------------------------------------------------
# 6. Optional profile of keygate under the same load
# ---------------------------------------------------------------------------------------
if [[ $PROFILE == 1 && " $TARGETS " == *" d "* ]]; then
    echo
    if command -v perf >/dev/null 2>&1; then
        log "profiling keygate with perf during one extra $DURATION run (not in the table)"
        secs=$DURATION_SECS
        start perf perf record -F 999 -p "$KEYGATE_PID" -o "$DIR/perf.data" -- sleep "$((secs > 2 ? secs - 1 : secs))"
        PERF_PID=$LAST_PID
        run_wrk d "$DURATION" "$DIR/wrk-d-profile.txt"
        wait "$PERF_PID" 2>/dev/null || true
        if [[ -s $DIR/perf.data ]]; then
            echo "top symbols in keygate (self time, perf record -F 999):"
            perf report -i "$DIR/perf.data" --stdio --no-children --sort dso,symbol \
                --percent-limit 0.8 2>/dev/null | grep -v '^#' | grep -v '^$' |
                sed 's/[[:space:]-]*$//' | head -n 40
        else
            warn "perf recorded nothing (see $DIR/perf.out)"
            cat "$DIR/perf.out" >&2 || true
        fi
    else
        warn "perf is not installed (apt-get install -y linux-perf); skipping the profile"
    fi
fi

bad=$(($(sum_col 8) + $(sum_col 9)))
if ((bad > 0)); then
    echo
    echo "FAILED: $bad non-2xx answers or socket errors during the measured runs (wrk outputs in $DIR; KEEP=1 keeps them)"
    exit 1
fi
