#!/usr/bin/env bash
# A real etcd for the cluster-mode tests: Debian's etcd-server (3.4), unpacked (not installed)
# under $POLARIS_CACHE (default ~/.cache/polaris-mesh), run on free loopback ports with its data in
# a temporary directory.
#
#   e2e/etcd.sh start DIR   start etcd; writes DIR/env (POLARIS_TEST_ETCD=http://127.0.0.1:PORT, and
#                           POLARIS_TEST_ETCD_BIN, for tests that run an etcd of their own) and
#                           waits until it answers
#   e2e/etcd.sh stop DIR    stop what `start DIR` started
set -euo pipefail

CACHE="${POLARIS_CACHE:-$HOME/.cache/polaris-mesh}"
ROOT="$CACHE/etcd"
ETCD="$ROOT/usr/bin/etcd"

log() { echo "etcd.sh: $*" >&2; }
# shellcheck source=e2e/debs.sh
source "$(dirname "$0")/debs.sh"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
    local dir=$1
    if [ ! -x "$ETCD" ]; then
        log "unpacking Debian's etcd-server"
        unpack_debs "$ROOT" etcd-server
    fi
    mkdir -p "$dir"
    local client peer
    client=$(free_port)
    peer=$(free_port)
    "$ETCD" --data-dir "$dir/data" --name polaris-test \
        --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "polaris-test=http://127.0.0.1:$peer" >"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"
    for _ in $(seq 1 100); do
        if python3 - "$client" <<'PY' 2>/dev/null; then
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1) as r:
    sys.exit(0 if b'"true"' in r.read() else 1)
PY
            printf 'export POLARIS_TEST_ETCD=http://127.0.0.1:%s\nexport POLARIS_TEST_ETCD_BIN=%s\n' "$client" "$ETCD" >"$dir/env"
            log "etcd ready at http://127.0.0.1:$client"
            return
        fi
        sleep 0.1
    done
    log "etcd did not start; its log:"
    tail -20 "$dir/etcd.log" >&2
    exit 1
}

stop() {
    local dir=$1
    if [ -f "$dir/etcd.pid" ]; then
        kill "$(cat "$dir/etcd.pid")" 2>/dev/null || true
        rm -f "$dir/etcd.pid"
    fi
}

case "${1:-}" in
start) start "$2" ;;
stop) stop "$2" ;;
*)
    echo "usage: e2e/etcd.sh start DIR | stop DIR" >&2
    exit 2
    ;;
esac
