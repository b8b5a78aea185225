#!/usr/bin/env bash
# systemd/syscalls.sh — lists the system calls keygate makes that systemd/keygate.service's
# SystemCallFilter= refuses (a refused call fails with EPERM under the unit: a background
# feature quietly stops working, or worse). Run it after adding code that may make a new kind
# of system call:
#
#     bash systemd/syscalls.sh          # exit 0: every call keygate made is allowed
#
# It runs keygate under strace, on 127.0.0.1 with ephemeral ports, through a session that
# covers start-up with 40 000 keys (so the huge-page move runs), key management through the
# admin API, keyed and refused requests, metrics, a SIGHUP reload, and a SIGTERM shutdown
# with its usage flush (TLS is not exercised); then it expands the unit's filter with
# `systemd-analyze syscall-filter` and compares. Needs strace, curl and systemd-analyze
# (installed with apt-get when missing, as root: see benches/load/tools.sh).
# Knobs: KEYS=40000, BIN=target/release/keygate.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
unit="$root/systemd/keygate.service"
keys=${KEYS:-40000}
bin=${BIN:-$root/target/release/keygate}

log() { printf '==> syscalls.sh: %s\n' "$*" >&2; }
die() {
    printf 'syscalls.sh: error: %s\n' "$*" >&2
    exit 1
}
# shellcheck source=benches/load/tools.sh
source "$root/benches/load/tools.sh"
need_tools strace:strace curl:curl systemd-analyze:systemd

if [ -z "${BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet --bin keygate --example gen_store)
else
    (cd "$root" && cargo build --release --quiet --example gen_store)
fi

work=$(mktemp -d /tmp/keygate-syscalls.XXXXXX)
tracer=""
cleanup() {
    if [ -n "$tracer" ] && kill -0 "$tracer" 2>/dev/null; then
        pkill -TERM -P "$tracer" 2>/dev/null || true
        wait "$tracer" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

sed -e 's/^listen = "127.0.0.1:[0-9]*"/listen = "127.0.0.1:0"/' \
    -e 's#^path = "data/keygate.redb"#path = "keys.redb"#' \
    "$root/gateway.toml" >"$work/gateway.toml"
"$root/target/release/examples/gen_store" "$work/keys.redb" "$keys" "$work/secrets.txt" 2>/dev/null
# Offline (no gateway running yet): an admin key straight into the store.
admin=$(cd "$work" && "$bin" --config gateway.toml keys create --name syscalls --role admin --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')

cd "$work"
strace -f -qq -o strace.out "$bin" serve --config gateway.toml >serve.log 2>&1 &
tracer=$!
wait_log() {
    for _ in $(seq 1 600); do
        grep -q "$1" serve.log && return 0
        kill -0 "$tracer" 2>/dev/null || { cat serve.log >&2; echo "keygate exited" >&2; exit 1; }
        sleep 0.2
    done
    echo "timed out waiting for '$1' in keygate's log" >&2
    exit 1
}
wait_log "admin API listening"
data=$(grep -o 'data plane listening listen=[0-9.:]*' serve.log | head -1 | cut -d= -f2)
admin_addr=$(grep -o 'admin API listening listen=[0-9.:]*' serve.log | head -1 | cut -d= -f2)
wait_log "huge pages\|4 KiB pages"

api() { curl -sf -o /dev/null -H "Authorization: Bearer $admin" -H 'content-type: application/json' "$@"; }
api -X POST -d '{"name":"probe","role":"operator"}' "http://$admin_addr/v1/keys"
api "http://$admin_addr/v1/keys"
api "http://$admin_addr/metrics"
secret=$(head -1 secrets.txt)
for _ in 1 2 3; do
    curl -sf -o /dev/null -H "X-API-Key: $secret" "http://$data/hello"
done
curl -s -o /dev/null "http://$data/hello" # refused: no key
curl -sf -o /dev/null "http://$admin_addr/healthz"
keygate_pid=$(pgrep -P "$tracer" -x keygate)
kill -HUP "$keygate_pid"
wait_log "configuration reloaded"
kill -TERM "$keygate_pid"
wait "$tracer" || true
tracer=""

# The unit's filter, expanded: the first SystemCallFilter= line allows (or with ~, denies);
# each later one adds to or (with ~) takes from that set.
expand() {
    local item
    for item in "$@"; do
        if [[ $item == @* ]]; then
            expand $(systemd-analyze syscall-filter "$item" | awk 'NR > 1 && !/^ *#/ && NF {print $1}')
        else
            echo "$item"
        fi
    done
}
if ! grep -m1 '^SystemCallFilter=' "$unit" | grep -q '^SystemCallFilter=[^~]'; then
    echo "the first SystemCallFilter= line of $unit is a deny list: not supported here" >&2
    exit 2
fi
allowed=$(mktemp) used=$(mktemp)
: >"$allowed"
while IFS= read -r line; do
    list=${line#SystemCallFilter=}
    if [[ $list == ~* ]]; then
        expand ${list#\~} | sort -u >"$allowed.deny"
        sort -u "$allowed" | comm -23 - "$allowed.deny" >"$allowed.next"
        mv "$allowed.next" "$allowed"
    else
        { cat "$allowed"; expand $list; } | sort -u >"$allowed.next"
        mv "$allowed.next" "$allowed"
    fi
done < <(grep '^SystemCallFilter=' "$unit")
grep -oE '^[0-9]+ +[a-z0-9_]+\(' strace.out | awk '{print $2}' | tr -d '(' | sort -u >"$used"
refused=$(comm -23 "$used" "$allowed")
echo "keygate made $(wc -l <"$used") kinds of system call"
rm -f "$allowed" "$allowed.deny" "$used"
if [ -n "$refused" ]; then
    echo "refused by $unit's SystemCallFilter=:"
    echo "$refused" | sed 's/^/  /'
    exit 1
fi
echo "all allowed by $unit's SystemCallFilter="
