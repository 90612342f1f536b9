#!/usr/bin/env bash
# The chart's test tools, from Debian's packages, unpacked and built under $POLARIS_CACHE (default
# ~/.cache/polaris-mesh), outside the repository; nothing is installed system-wide.
#
#   e2e/chart.sh build                  build (or find) e2e/chart-render (Go text/template + sprig, as
#                                       Helm renders) and unpack kubectl 1.20; prints both paths
#   e2e/chart.sh render [-f VALUES]...  render charts/polaris-mesh to stdout (release polaris-mesh in
#                                       namespace polaris-system)
#
# The renderer builds with the Go that e2e/apiserver.sh unpacks (Debian's golang-1.19), in GOPATH
# mode over the Debian -dev packages' sources.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${POLARIS_CACHE:-$HOME/.cache/polaris-mesh}"
ROOT="$CACHE/chart"
GOROOT_DIR="$CACHE/kube-1.20.5+really1.20.2/tools/usr/lib/go-1.19"
RENDER="$ROOT/bin/chart-render"
KUBECTL="$ROOT/kubectl/usr/bin/kubectl"
GO_DEBS=(golang-github-masterminds-sprig-dev golang-github-masterminds-semver-dev
    golang-github-huandu-xstrings-dev golang-github-imdario-mergo-dev golang-github-google-uuid-dev
    golang-golang-x-crypto-dev golang-github-mitchellh-copystructure-dev
    golang-github-mitchellh-reflectwalk-dev golang-github-shopspring-decimal-dev
    golang-github-spf13-cast-dev golang-github-ghodss-yaml-dev golang-gopkg-yaml.v2-dev
    golang-github-masterminds-goutils-dev)

log() { echo "chart.sh: $*" >&2; }

# shellcheck source=e2e/debs.sh
source e2e/debs.sh

build() {
    if [ ! -x "$KUBECTL" ]; then
        log "unpacking Debian's kubernetes-client (kubectl 1.20)"
        unpack_debs "$ROOT/kubectl" kubernetes-client
    fi
    # The renderer is rebuilt when its source changes.
    local sum
    sum=$(sha256sum e2e/chart-render/main.go | cut -c1-16)
    if [ ! -x "$RENDER-$sum" ]; then
        [ -x "$GOROOT_DIR/bin/go" ] || e2e/apiserver.sh build >/dev/null
        if [ ! -d "$ROOT/go/usr/share/gocode/src/github.com/Masterminds/sprig" ]; then
            log "unpacking sprig and its dependencies' sources"
            unpack_debs "$ROOT/go" "${GO_DEBS[@]}"
        fi
        local src="$ROOT/go/usr/share/gocode/src"
        # Debian installs major versions at their v1 path; GOPATH mode finds /v3 through these.
        ln -sfn . "$src/github.com/Masterminds/sprig/v3"
        ln -sfn . "$src/github.com/Masterminds/semver/v3"
        mkdir -p "$ROOT/bin"
        (
            export GOROOT="$GOROOT_DIR" GOPATH="$ROOT/go/usr/share/gocode" GO111MODULE=off GOPROXY=off
            export GOCACHE="$ROOT/gocache" CGO_ENABLED=0 GOFLAGS=
            "$GOROOT_DIR/bin/go" build -o "$RENDER-$sum.tmp" ./e2e/chart-render/main.go
        ) || {
            log "building the renderer failed"
            exit 1
        }
        mv "$RENDER-$sum.tmp" "$RENDER-$sum"
    fi
    echo "$RENDER-$sum"
    echo "$KUBECTL"
}

case "${1:-}" in
build) build ;;
render)
    shift
    render=$(build | head -1)
    args=()
    while [ $# -gt 0 ]; do
        case "$1" in
        -f) args+=(-f "$2"); shift 2 ;;
        *) log "unknown argument $1"; exit 2 ;;
        esac
    done
    "$render" "${args[@]}" charts/polaris-mesh
    ;;
*)
    echo "usage: e2e/chart.sh build | render [-f VALUES]..." >&2
    exit 2
    ;;
esac
