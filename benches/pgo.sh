#!/usr/bin/env bash
# benches/pgo.sh — a profile-guided (PGO) release build of keygate: target/pgo/keygate.
#
#     bash benches/pgo.sh                # ~10 minutes on 2 cores; then target/pgo/keygate
#     PGO=1 bash benches/load.sh         # the load benchmark with this build
#
# Profile-guided optimisation lays the code a request runs out contiguously and moves what
# it does not run out of the way. keygate's request path runs mostly once per request
# through many distinct functions (its own, tokio's, http's), so its cost is largely
# instruction-cache misses (benches/PERFORMANCE.md, "Round four"); PGO removes most of them
# (the same, "Round five"). The same cargo release profile, plus the profile of a training
# run.
#
# Steps:
#   1. an instrumented build (-Cprofile-generate) in target/pgo/generate;
#   2. a training run: that keygate in front of an nginx upstream, with a store of KEYS
#      keys (benches/load's templates and gen_store), under wrk for TRAIN: every key once
#      in order, then keys at random; plus a few refused requests (no key, unknown key);
#   3. llvm-profdata merges the run's profile (target/pgo/keygate.profdata);
#   4. the optimised build (-Cprofile-use) in target/pgo/use, copied to target/pgo/keygate.
#
# Needs rustup's llvm-tools component (added when missing: llvm-profdata must match rustc's
# LLVM) and nginx, wrk and curl (installed with apt-get when missing, as load.sh does).
# Knobs: KEYS=10000 TRAIN=20s. Honours CARGO_TARGET_DIR. Not part of CI.

set -euo pipefail

KEYS=${KEYS:-10000}
TRAIN=${TRAIN:-20s}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPL=$ROOT/benches/load
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/pgo

log() { printf '==> pgo.sh: %s\n' "$*" >&2; }
die() {
    printf 'pgo.sh: error: %s\n' "$*" >&2
    exit 1
}
[[ $KEYS =~ ^[1-9][0-9]*$ ]] || die "KEYS must be a whole number of at least 1 (got '$KEYS')"
[[ $TRAIN =~ ^[1-9][0-9]*[smh]?$ ]] || die "TRAIN must be a wrk duration such as 20s (got '$TRAIN')"

# ---------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------
SYSROOT=$(rustc --print sysroot)
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$SYSROOT/lib/rustlib/$HOST/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
    log "adding rustup's llvm-tools component (llvm-profdata)"
    rustup component add llvm-tools >&2 || rustup component add llvm-tools-preview >&2 ||
        die "could not add the llvm-tools component (rustup component add llvm-tools)"
fi
[[ -x $PROFDATA ]] || die "$PROFDATA not found after adding llvm-tools"
# shellcheck source=benches/load/tools.sh
source "$TPL/tools.sh"
need_tools nginx:nginx wrk:wrk curl:curl

# ---------------------------------------------------------------------------------------
# 1. Instrumented build. Build scripts are instrumented too (RUSTFLAGS reaches them): their
#    profiles go to a directory of their own, and only the training run's are merged.
# ---------------------------------------------------------------------------------------
rm -rf "$OUT/profiles" "$OUT/build-profiles"
mkdir -p "$OUT/profiles"
log "instrumented build (target/pgo/generate)"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-generate=$OUT/build-profiles" \
    cargo build --release --bin keygate --target-dir "$OUT/generate") || die "instrumented build failed"
(cd "$ROOT" && cargo build --release --example gen_store) || die "building gen_store failed"
GEN_STORE=$TARGET_DIR/release/examples/gen_store

# ---------------------------------------------------------------------------------------
# 2. Training run
# ---------------------------------------------------------------------------------------
DIR=$(mktemp -d "${TMPDIR:-/tmp}/keygate-pgo.XXXXXX")
chmod 755 "$DIR" # nginx workers may run as another user
PIDS=()
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[i]}" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=benches/load/ports.sh
source "$TPL/ports.sh"
read -r UPSTREAM_PORT KEYGATE_PORT ADMIN_PORT <<<"$(free_ports 3)"
[[ -n $ADMIN_PORT ]] || die "could not pick free ports"
if [[ $(id -u) == 0 ]]; then USER_LINE="user root;"; else USER_LINE=""; fi
mkdir -p "$DIR/nginx-upstream-tmp"
render "$TPL/nginx-upstream.conf.in" "$DIR/nginx-upstream.conf"
render "$TPL/gateway.toml.in" "$DIR/gateway.toml"
log "training: a store with $KEYS keys"
"$GEN_STORE" "$DIR/keygate.redb" "$KEYS" "$DIR/secrets.txt" 2>"$DIR/gen_store.out" ||
    { cat "$DIR/gen_store.out" >&2; die "gen_store failed"; }

nginx -p "$DIR" -c "$DIR/nginx-upstream.conf" >"$DIR/nginx-upstream.out" 2>&1 &
PIDS+=($!)
wait_http nginx-upstream "${PIDS[0]}" "http://127.0.0.1:$UPSTREAM_PORT/"
LLVM_PROFILE_FILE="$OUT/profiles/keygate-%p.profraw" TOKIO_WORKER_THREADS=1 \
    "$OUT/generate/release/keygate" --config "$DIR/gateway.toml" serve >"$DIR/keygate.out" 2>&1 &
KG=$!
PIDS+=("$KG")
wait_http keygate "$KG" "http://127.0.0.1:$ADMIN_PORT/healthz"

URL=http://127.0.0.1:$KEYGATE_PORT/
load() { KEYS_FILE=$DIR/secrets.txt wrk -t 1 -c 64 -d "$1" -s "$TPL/wrk.lua" "$URL" | awk '/Requests\/sec/ { print $2 }'; }
log "training: every key once, in order, then $TRAIN of keys at random"
KEY_ORDER=seq load 5s >/dev/null
rps=$(load "$TRAIN")
for _ in $(seq 20); do
    curl -s -o /dev/null "$URL"
    curl -s -o /dev/null -H "X-API-Key: kg_live_unknown" "$URL"
done
log "training: $rps requests/s (instrumented)"
# TERM: keygate drains and exits normally, which writes the profile.
kill -TERM "$KG"
wait "$KG" || { show_log keygate; die "keygate exited with an error"; }
compgen -G "$OUT/profiles/keygate-*.profraw" >/dev/null || die "the training run wrote no profile"

# ---------------------------------------------------------------------------------------
# 3-4. Merge, then the optimised build
# ---------------------------------------------------------------------------------------
"$PROFDATA" merge -o "$OUT/keygate.profdata" "$OUT"/profiles/keygate-*.profraw
log "optimised build with $OUT/keygate.profdata (target/pgo/use)"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-use=$OUT/keygate.profdata" \
    cargo build --release --bin keygate --target-dir "$OUT/use") || die "PGO build failed"
cp "$OUT/use/release/keygate" "$OUT/keygate"
log "done: $OUT/keygate"
