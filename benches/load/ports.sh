# Sourced by benches/load.sh and benches/ab.sh.

free_ports() { # count: free TCP ports on 127.0.0.1
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
    else
        local picked=() p
        while ((${#picked[@]} < $1)); do
            p=$((20000 + RANDOM % 30000))
            [[ " ${picked[*]} " == *" $p "* ]] && continue
            (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
            picked+=("$p")
        done
        echo "${picked[*]}"
    fi
}
