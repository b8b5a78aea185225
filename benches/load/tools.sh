# Sourced by benches/load.sh, benches/pgo.sh and systemd/syscalls.sh (which define log and
# die, and DIR, their work directory, before calling the functions that use it).

need_tools() { # command:package...: apt-get installs the packages of missing commands
    local pair cmd pkg need=()
    for pair in "$@"; do
        cmd=${pair%%:*} pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || need+=("$pkg")
    done
    if ((${#need[@]})); then
        [[ $(id -u) == 0 ]] || die "missing ${need[*]}: install them or run as root"
        log "installing ${need[*]} with apt-get"
        apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
            die "apt-get install ${need[*]} failed"
    fi
    export PATH=$PATH:/usr/sbin:/sbin
}

render() { # template output: each @NAME@ becomes $NAME; one left without a value is an error
    local v args=()
    for v in DIR UPSTREAM_PORT NGINX_PORT HAPROXY_PORT KEYGATE_PORT ADMIN_PORT USER_LINE; do
        [[ -v $v ]] && args+=(-e "s|@$v@|${!v}|g")
    done
    sed "${args[@]}" "$1" >"$2"
    if grep -q '@[A-Z_]*@' "$2"; then
        die "$1: $(grep -o '@[A-Z_]*@' "$2" | head -n 1) has no value"
    fi
}

show_log() { # name: the last lines of $DIR/name.out (and of its error log)
    printf -- '--- last lines of %s output ---\n' "$1" >&2
    tail -n 20 "$DIR/$1.out" >&2 || true
    if [[ -f $DIR/$1.error.log ]]; then tail -n 20 "$DIR/$1.error.log" >&2; fi
    true
}

wait_http() { # name pid url: until anything answers on url (10 s)
    local name=$1 pid=$2 url=$3 i
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log "$name"
            die "$name exited during startup"
        fi
        if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) != 000 ]]; then
            return 0
        fi
        sleep 0.1
    done
    show_log "$name"
    die "$name did not answer on $url within 10 s"
}
