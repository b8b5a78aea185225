# Sourced by benches/load.sh and benches/pgo.sh (which define log and die).

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
