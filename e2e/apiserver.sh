#!/usr/bin/env bash
# A real kube-apiserver for tests, built from Debian's `kubernetes` source package (1.20) with
# Debian's Go, and run with Debian's etcd-server, all on loopback. Nothing is installed system-wide:
# the packages are unpacked, and the build is cached, under $POLARIS_CACHE (default
# ~/.cache/polaris-mesh), outside the repository.
#
#   e2e/apiserver.sh build        build (or find) kube-apiserver and etcd; prints their paths
#   e2e/apiserver.sh start DIR    start etcd + kube-apiserver on free loopback ports; writes DIR/env
#                                 (POLARIS_TEST_KUBE_URL, POLARIS_TEST_KUBE_TOKEN, POLARIS_TEST_KUBE_CA,
#                                 POLARIS_TEST_KUBE_SA_KEY) and DIR/kubeconfig (the admin token)
#                                 and waits until the apiserver is ready
#   e2e/apiserver.sh stop DIR     stop what `start DIR` started
#
# A cold build takes about 5 minutes on 2 cores (most of it Go compiling the apiserver).
#
# Debian builds 1.20 with its Go 1.19, newer than the Go the vendored modern-go/reflect2 1.0.1
# knows: its map iteration crashes the apiserver (SIGSEGV in json-iterator) when it encodes a map
# through reflection, as it does to pretty-print for curl and to record a mutating webhook's patch.
# The build applies reflect2 1.0.2's fix (reflect.mapiterinit takes the iterator since Go 1.18).
set -euo pipefail

CACHE="${POLARIS_CACHE:-$HOME/.cache/polaris-mesh}"
K8S_VERSION="1.20.5+really1.20.2"
ROOT="$CACHE/kube-$K8S_VERSION"
# The suffix names the reflect2 fix: a binary built without it is not reused.
APISERVER="$ROOT/bin/kube-apiserver-reflect2"
ETCD="$ROOT/etcd/usr/bin/etcd"

log() { echo "apiserver.sh: $*" >&2; }

# reflect2 1.0.2's fix for Go 1.18 and later, applied to the vendored 1.0.1: the caller allocates
# the (full-size) map iterator that reflect.mapiterinit now fills.
patch_reflect2() {
    local dir="$1"
    perl -0pi -e 's{// m escapes into the return value.*?func mapiterinit\(rtype unsafe.Pointer, m unsafe.Pointer\) \*hiter}{//go:linkname mapiterinit reflect.mapiterinit\nfunc mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)}s' "$dir/unsafe_link.go"
    perl -0pi -e 's{type hiter struct \{.*?\n\}}{type hiter struct {\n\tkey         unsafe.Pointer\n\tvalue       unsafe.Pointer\n\tt           unsafe.Pointer\n\th           unsafe.Pointer\n\tbuckets     unsafe.Pointer\n\tbptr        unsafe.Pointer\n\toverflow    *[]unsafe.Pointer\n\toldoverflow *[]unsafe.Pointer\n\tstartBucket uintptr\n\toffset      uint8\n\twrapped     bool\n\tB           uint8\n\ti           uint8\n\tbucket      uintptr\n\tcheckBucket uintptr\n}}s' "$dir/unsafe_link.go"
    perl -0pi -e 's#return &UnsafeMapIterator\{\n\t\thiter:      mapiterinit\(type2.rtype, \*\(\*unsafe.Pointer\)\(obj\)\),#var it hiter\n\tmapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)\n\treturn &UnsafeMapIterator{\n\t\thiter:      &it,#' "$dir/unsafe_map.go"
    grep -q 'it \*hiter)' "$dir/unsafe_link.go" && grep -q 'hiter:      &it' "$dir/unsafe_map.go" || {
        log "patching reflect2 failed"
        exit 1
    }
}

# shellcheck source=e2e/debs.sh
source "$(dirname "$0")/debs.sh"

build() {
    if [ -x "$APISERVER" ] && [ -x "$ETCD" ]; then
        echo "$APISERVER"
        echo "$ETCD"
        return
    fi
    mkdir -p "$ROOT/bin"
    if [ ! -x "$ETCD" ]; then
        log "unpacking Debian's etcd-server"
        unpack_debs "$ROOT/etcd" etcd-server
    fi
    if [ ! -x "$APISERVER" ]; then
        log "building kube-apiserver $K8S_VERSION from Debian's source (about 5 minutes, once)"
        unpack_debs "$ROOT/tools" golang-1.19-go golang-1.19-src rsync libpopt0 jq libjq1 libonig5
        local lists="$ROOT/apt-lists" src="$ROOT/src"
        mkdir -p "$lists/partial" "$src"
        printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main\n' \
            >"$ROOT/sources.list"
        local apt=(-o "Dir::Etc::SourceList=$ROOT/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$lists")
        apt-get "${apt[@]}" update >/dev/null 2>&1 || { log "apt-get update (deb-src) failed"; exit 1; }
        (cd "$src" && apt-get "${apt[@]}" source --download-only "kubernetes=$K8S_VERSION-1.1+deb12u1" >/dev/null 2>&1 ||
            apt-get "${apt[@]}" source --download-only kubernetes >/dev/null 2>&1) || {
            log "apt-get source kubernetes failed"
            exit 1
        }
        local tree="$ROOT/tree"
        rm -rf "$tree"
        mkdir -p "$tree"
        tar xzf "$src"/kubernetes_*.orig.tar.gz -C "$tree"
        local top
        top=$(find "$tree" -mindepth 1 -maxdepth 1 -type d | head -1)
        patch_reflect2 "$top/vendor/github.com/modern-go/reflect2"
        local tools="$ROOT/tools"
        local goroot="$tools/usr/lib/go-1.19"
        # The build wants the tree at its import path inside a GOPATH.
        local gopath="$ROOT/gopath"
        mkdir -p "$gopath/src/k8s.io"
        ln -sfn "$top" "$gopath/src/k8s.io/kubernetes"
        (
            cd "$gopath/src/k8s.io/kubernetes"
            export GOROOT="$goroot" GOPATH="$gopath" GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0
            export GOCACHE="$ROOT/gocache" HOME="$ROOT/home"
            export PATH="$goroot/bin:$tools/usr/bin:$PATH"
            export LD_LIBRARY_PATH="$tools/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            mkdir -p "$HOME"
            make WHAT=cmd/kube-apiserver >"$ROOT/build.log" 2>&1
        ) || {
            log "the build failed; see $ROOT/build.log"
            tail -30 "$ROOT/build.log" >&2
            exit 1
        }
        cp "$top/_output/bin/kube-apiserver" "$APISERVER.tmp"
        mv "$APISERVER.tmp" "$APISERVER"
        # The tree and the Go cache are big and needed only to build.
        rm -rf "$tree" "$ROOT/gocache" "$gopath"
    fi
    "$APISERVER" --version >&2
    echo "$APISERVER"
    echo "$ETCD"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
    local dir=$1
    build >/dev/null
    mkdir -p "$dir/certs"
    local etcd_client etcd_peer secure
    etcd_client=$(free_port)
    etcd_peer=$(free_port)
    secure=$(free_port)
    "$ETCD" --data-dir "$dir/etcd" --name test \
        --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "test=http://127.0.0.1:$etcd_peer" >"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/sa.key" 2>/dev/null
    openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
    local token
    token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    echo "$token,admin,admin-uid,system:masters" >"$dir/tokens.csv"
    "$APISERVER" --etcd-servers "http://127.0.0.1:$etcd_client" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$secure" \
        --cert-dir "$dir/certs" --token-auth-file "$dir/tokens.csv" --authorization-mode RBAC \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$dir/sa.pub" --service-account-signing-key-file "$dir/sa.key" \
        --api-audiences https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range 10.96.0.0/16 --disable-admission-plugins ServiceAccount \
        >"$dir/apiserver.log" 2>&1 &
    echo $! >"$dir/apiserver.pid"
    local url="https://127.0.0.1:$secure"
    for _ in $(seq 1 300); do
        if curl -sfk -H "Authorization: Bearer $token" "$url/readyz" >/dev/null 2>&1; then
            cat >"$dir/env" <<EOF
export POLARIS_TEST_KUBE_URL=$url
export POLARIS_TEST_KUBE_TOKEN=$token
export POLARIS_TEST_KUBE_CA=$dir/certs/apiserver.crt
export POLARIS_TEST_KUBE_SA_KEY=$dir/sa.key
EOF
            cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: { server: "$url", certificate-authority: "$dir/certs/apiserver.crt" }
users:
- name: admin
  user: { token: "$token" }
contexts:
- name: test
  context: { cluster: test, user: admin }
current-context: test
EOF
            log "kube-apiserver ready at $url"
            return
        fi
        if ! kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null; then
            log "kube-apiserver exited; log:"
            tail -30 "$dir/apiserver.log" >&2
            exit 1
        fi
        sleep 0.2
    done
    log "kube-apiserver not ready after 60 s; log:"
    tail -30 "$dir/apiserver.log" >&2
    exit 1
}

stop() {
    local dir=$1
    for p in apiserver etcd; do
        if [ -f "$dir/$p.pid" ]; then
            kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
        fi
    done
}

case "${1:-}" in
build) build ;;
start) start "${2:?start DIR}" ;;
stop) stop "${2:?stop DIR}" ;;
*)
    echo "usage: $0 build | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
